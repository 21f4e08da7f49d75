"""HF `architectures` names -> our model classes, imported lazily so one family's import cost is paid only when used."""

from __future__ import annotations

import importlib

from transformers import PretrainedConfig

from loraserve.errors import UnsupportedModel

# architecture name -> (module under loraserve.models, class name)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma3ForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def model_class(config: PretrainedConfig) -> type:
    """The class implementing the first architecture of `config` that loraserve knows."""
    for name in config.architectures or []:
        if name in _ARCHITECTURES:
            module_name, class_name = _ARCHITECTURES[name]
            module = importlib.import_module(f"loraserve.models.{module_name}")
            return getattr(module, class_name)
    raise UnsupportedModel(
        f"architectures {config.architectures} are not supported; supported: {', '.join(supported_architectures())}"
    )
