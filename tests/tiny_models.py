"""Tiny random models of each architecture, saved as real HF folders (sharded safetensors, config, tokenizer).

Tests load these through the same code paths as a real checkpoint. Weights are random but seeded; the tokenizer is a
small byte-level BPE trained here on a fixed text, so multi-byte characters and leading spaces behave as they do in
real tokenizers.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
TOKENIZER_VOCAB = 384

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "Straße, café, naïve, 東京, 🙂 — multi-byte text matters for streaming.",
    '{"name": "loraserve", "adapters": [1, 2, 3], "ok": true}',
    "Once upon a time there was a small model that answered questions about adapters.",
] * 20


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of TOKENIZER_VOCAB tokens with BOS added to every encoding."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_model(config: PretrainedConfig, path: Path, seed: int = 0, init_std: float = 0.08) -> Path:
    """Build a seeded random model for `config` with transformers and save it as a sharded HF folder at `path`.

    `init_std` is larger than the usual 0.02 so logits are far from uniform and greedy choices are decisive.
    """
    config.vocab_size = TOKENIZER_VOCAB
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name or "layernorm" in name:
                param.normal_(mean=0.0 if _zero_centred_norm(config) else 1.0, std=0.1)
            else:
                param.normal_(mean=0.0, std=init_std)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="200KB")
    build_tokenizer().save_pretrained(path)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(path)
    return path


def _zero_centred_norm(config: PretrainedConfig) -> bool:
    """Gemma stores RMSNorm weights as w - 1."""
    return config.model_type.startswith("gemma")


def tiny_config(architecture: str) -> PretrainedConfig:
    """A 2-4 layer config of `architecture` with GQA and, where the family has one, a sliding window shorter than the
    test prompts, so every code path (rope scaling, windows, softcaps, qk-norm, fused projections) runs."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512,
    )
    factories = {
        "llama": lambda: LlamaConfig(**common),
        "llama3": lambda: LlamaConfig(
            **common,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 128},
        ),
        "mistral": lambda: MistralConfig(**common, sliding_window=6),
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(**common, head_dim=32),
        "phi3": lambda: Phi3Config(**common),
        "gemma": lambda: GemmaConfig(**common, head_dim=16),
        "gemma2": lambda: Gemma2Config(**common, head_dim=16, sliding_window=5),
        "gemma3": lambda: Gemma3TextConfig(
            **{**common, "num_hidden_layers": 4}, head_dim=16, sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        ),
    }
    config = factories[architecture]()
    config.architectures = [_ARCHITECTURE_CLASS[config.model_type]]
    return config


_ARCHITECTURE_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
ARCHITECTURES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3"]


def save_tiny_chat_model(path: Path, config: PretrainedConfig | None = None) -> Path:
    """A tiny Gemma 3 (or `config`, a variant of `tiny_config("gemma3")`) whose tokenizer carries the chat template
    loraserve ships for Gemma 3 (chat routes need one)."""
    save_tiny_model(config or tiny_config("gemma3"), path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = files("loraserve").joinpath("templates", "gemma3.jinja").read_text()
    tokenizer.save_pretrained(path)
    return path


def save_random_adapter(base_dir: Path, path: Path, seed: int, **lora_options: object) -> Path:
    """A PEFT LoRA adapter for the model at `base_dir`, with seeded random A and B scaled up (PEFT's non-default init
    is small) so that it clearly changes the base model's output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)
    model.save_pretrained(path)
    return path
