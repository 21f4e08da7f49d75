"""Turns `EngineConfig.model_id` into a loaded model, its tokenizer and its generation facts.

One place decides the source (default model, .gguf file, HF folder or Hub id), the dtype and the device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from loraserve.config import EngineConfig
from loraserve.layers.linear import (
    cpu_packing_applies,
    fuse_projection_groups,
    pack_linear_weights,
    quantize_linear_weights,
)
from loraserve.models.base import CausalLM
from loraserve.models.default_model import DEFAULT_MODEL_NAME, default_model_path
from loraserve.models.gguf import load_gguf
from loraserve.models.loader import load_model, resolve_model_dir

logger = logging.getLogger(__name__)

# Under --quantize the lm_head's int8 weights are multiplied with per-token int8 activations ("w8a8", quant/int8.py):
# at every batch size faster than a weight-only head at the weight-only head's perplexity, and its codes then serve a
# tied embedding table too, so the table is held once, in int8. The decoder stays weight-only: per-token activations
# there cost several times the perplexity (benchmarks/RESULTS.md, "Weight-only quantization", has the figures).
_LM_HEAD_FORMAT = "w8a8"


# Under --quantize int4, these projections are requantized to int8 instead, as llama.cpp's Q4_K_M gives attn_v more
# bits: on the default model they hold a small share of the decoder's weights and cost about half of int4's
# perplexity loss (benchmarks/RESULTS.md, "Weight-only quantization").
_INT8_UNDER_INT4 = ("k_proj", "v_proj")


def _requantized_format(fmt: str, name: str) -> str:
    """The format the float linear `name` is quantized to under --quantize `fmt`."""
    if name == "lm_head":
        return _LM_HEAD_FORMAT
    if fmt == "int4" and name.rpartition(".")[2] in _INT8_UNDER_INT4:
        return "int8"
    return fmt


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: set[int]
    name: str  # what the APIs report as the base model id
    max_model_len: int  # the model's own context length


def load(config: EngineConfig) -> LoadedModel:
    fmt = config.quantize
    # under int4, a GGUF file's 4-bit blocks arrive as int4 already, exactly, whatever `_requantized_format` says
    loaded = _load(config, lambda name: fmt == "int4" and name != "lm_head")
    if fmt is not None:
        counts = quantize_linear_weights(loaded.model, lambda name: _requantized_format(fmt, name))
        logger.info("quantized linear layers (lm_head to %s): %s", _LM_HEAD_FORMAT, counts)
    if cpu_packing_applies(config.torch_dtype(), config.torch_device()):
        logger.info("packed %d linear layers into oneDNN's bf16 layout", pack_linear_weights(loaded.model))
    if fused := fuse_projection_groups(loaded.model):
        logger.info("laid out %d projection groups end to end for the GEMV", fused)
    _return_freed_memory()
    return loaded


def _return_freed_memory() -> None:
    """Hand the memory that loading freed (float copies, a GGUF file's dequantized tensors) back to the system.

    glibc keeps freed heap memory for reuse, so without this the process stays as large as its loading peak and a
    quantized model's RSS barely shrinks with its weights.
    """
    if not sys.platform.startswith("linux"):
        return
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name) if libc_name else None
        trim = getattr(libc, "malloc_trim", None)  # glibc only: musl has none
    except OSError:
        return
    if trim is not None:
        trim(0)


def _load(config: EngineConfig, takes_int4: Callable[[str], bool]) -> LoadedModel:
    dtype, device = config.torch_dtype(), config.torch_device()
    model_id = config.model_id
    if model_id is None:
        path = default_model_path(config.cache_dir)
        logger.info("loading the default model %s from %s", DEFAULT_MODEL_NAME, path)
        return _load_gguf(path, DEFAULT_MODEL_NAME, config, takes_int4)
    if model_id.endswith(".gguf"):
        return _load_gguf(Path(model_id), model_id, config, takes_int4)
    model_dir = resolve_model_dir(model_id, revision=config.revision, token=config.hf_token,
                                  cache_dir=str(config.cache_dir / "hub"))
    model = load_model(model_dir, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return LoadedModel(model, tokenizer, _eos_ids(model_dir, model, tokenizer), model_id, _max_len(model))


def _load_gguf(path: Path, name: str, config: EngineConfig, takes_int4: Callable[[str], bool]) -> LoadedModel:
    loaded = load_gguf(path, config.torch_dtype(), config.torch_device(), config.cache_dir / "tokenizers", takes_int4)
    return LoadedModel(loaded.model, loaded.tokenizer, loaded.eos_token_ids, name, _max_len(loaded.model))


def _eos_ids(model_dir: Path, model: CausalLM, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends generation: generation_config.json, the model config and the tokenizer may each list some."""
    ids: set[int] = set()
    candidates = [getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id]
    if (model_dir / "generation_config.json").exists():
        candidates.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    for candidate in candidates:
        if isinstance(candidate, int):
            ids.add(candidate)
        elif candidate:
            ids.update(candidate)
    return ids


def _max_len(model: CausalLM) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
