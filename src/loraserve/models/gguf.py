"""GGUF files -> our models: config from the metadata, llama.cpp tensor names -> HF names, dequantized weights.

The config is built the way transformers' own GGUF loader builds it (same metadata keys, same config class defaults),
so both read one file as the same model. llama.cpp's conversion stores Gemma norm weights as `w + 1`; we subtract
the 1 back. The tokenizer is converted once by transformers (about 20 s for Gemma's 262k vocabulary) and cached.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer, Gemma3TextConfig, PretrainedConfig, PreTrainedTokenizerBase

from loraserve.errors import ModelLoadError, UnsupportedModel
from loraserve.models.base import CausalLM
from loraserve.models.loader import build_model

logger = logging.getLogger(__name__)

# metadata key (after "<arch>.") -> config field, as transformers maps them
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.key_length": "head_dim",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
}

# llama.cpp block tensor name -> HF module path inside model.layers.N
_GEMMA3_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class _Architecture:
    config_class: type[PretrainedConfig]
    hf_architecture: str
    block_names: dict[str, str]
    norm_offset: float  # subtracted from every norm weight (llama.cpp stores Gemma's `w + 1`)
    end_of_turn_tokens: tuple[str, ...]  # chat-turn terminators that also end generation


_ARCHITECTURES = {
    "gemma3": _Architecture(Gemma3TextConfig, "Gemma3ForCausalLM", _GEMMA3_BLOCK_NAMES, 1.0, ("<end_of_turn>",)),
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _architecture(reader: gguf.GGUFReader) -> tuple[str, _Architecture]:
    name = reader.fields["general.architecture"].contents()
    if name not in _ARCHITECTURES:
        raise UnsupportedModel(f"GGUF architecture {name!r} is not supported; supported: {sorted(_ARCHITECTURES)}")
    return name, _ARCHITECTURES[name]


def gguf_config(reader: gguf.GGUFReader) -> PretrainedConfig:
    name, arch = _architecture(reader)
    values = {}
    for key, field_name in _CONFIG_KEYS.items():
        field = reader.fields.get(f"{name}.{key}")
        if field is not None:
            values[field_name] = field.contents()
    values["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    for token in ("bos", "eos", "padding"):
        field = reader.fields.get(f"tokenizer.ggml.{token}_token_id")
        if field is not None:
            values["pad_token_id" if token == "padding" else f"{token}_token_id"] = field.contents()
    config = arch.config_class(**values)
    config.architectures = [arch.hf_architecture]
    config.tie_word_embeddings = not any(t.name == "output.weight" for t in reader.tensors)
    return config


def _hf_name(gguf_name: str, arch: _Architecture) -> str:
    match = _BLOCK.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part not in arch.block_names:
            raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no counterpart in the model")
        return f"model.layers.{layer}.{arch.block_names[part]}.{kind}"
    stem, kind = gguf_name.rsplit(".", 1)
    if stem not in _GLOBAL_NAMES:
        raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no counterpart in the model")
    return f"{_GLOBAL_NAMES[stem]}.{kind}"


def _tensors(reader: gguf.GGUFReader, arch: _Architecture) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized float32 tensors under HF names; GGUF lists dims innermost first, numpy gives them outermost first."""
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        values = np.ascontiguousarray(values.reshape([int(d) for d in reversed(tensor.shape)]), dtype=np.float32)
        name = _hf_name(tensor.name, arch)
        if name.endswith("norm.weight"):
            values = values - arch.norm_offset
        yield name, torch.from_numpy(values)


@dataclass
class GGUFModel:
    model: CausalLM
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: set[int]


def load_gguf(path: Path, dtype: torch.dtype, device: torch.device, tokenizer_cache: Path) -> GGUFModel:
    """Model, tokenizer and EOS ids of a GGUF file (its metadata is parsed once: about 10 s for a 262k vocab)."""
    reader = gguf.GGUFReader(path)
    _, arch = _architecture(reader)
    model = build_model(gguf_config(reader), dtype, device)
    model.load_weights(_tensors(reader, arch))
    tokenizer = _tokenizer(path, tokenizer_cache)
    # The file records only <eos>; chat-turn terminators end generation too (Gemma 3's generation_config lists both).
    eos = {int(reader.fields["tokenizer.ggml.eos_token_id"].contents())}
    vocab = tokenizer.get_vocab()
    eos.update(vocab[token] for token in arch.end_of_turn_tokens if token in vocab)
    return GGUFModel(model, tokenizer, eos)


def _tokenizer(path: Path, cache_dir: Path) -> PreTrainedTokenizerBase:
    """The file's tokenizer, converted once by transformers and cached by the file's content, with a chat template."""
    target = cache_dir / _file_key(path)
    if (target / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(target)
    else:
        logger.info("converting the GGUF tokenizer of %s (once; cached in %s)", path.name, target)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer.save_pretrained(target)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = shipped_chat_template("gemma3")
    return tokenizer


def shipped_chat_template(name: str) -> str:
    return files("loraserve").joinpath("templates", f"{name}.jinja").read_text()


def _file_key(path: Path) -> str:
    """Identifies a GGUF file by its size and the hash of its first MiB (the header holds the whole vocabulary)."""
    with path.open("rb") as handle:
        head = handle.read(1 << 20)
    return f"{path.stat().st_size}-{hashlib.sha256(head).hexdigest()[:16]}"
