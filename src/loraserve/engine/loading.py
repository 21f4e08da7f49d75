"""Turns `EngineConfig.model_id` into a loaded model, its tokenizer and its generation facts.

One place decides the source (default model, .gguf file, HF folder or Hub id), the dtype and the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from loraserve.config import EngineConfig
from loraserve.layers.linear import cpu_packing_applies, pack_linear_weights, quantize_linear_weights
from loraserve.models.base import CausalLM
from loraserve.models.default_model import DEFAULT_MODEL_NAME, default_model_path
from loraserve.models.gguf import load_gguf
from loraserve.models.loader import load_model, resolve_model_dir

logger = logging.getLogger(__name__)

# Under --quantize the lm_head gets a separate int8 copy (a tied head keeps the embedding's float table beside it),
# multiplied with per-token int8 activations on oneDNN's int8 GEMM where it runs ("w8a8", quant/int8.py). Measured on
# Gemma 3 270M (benchmarks/RESULTS.md, "Weight-only quantization"): it halves the head's bytes (335 -> 168 MB) and
# leaves perplexity where the weight-only int8 head has it (25.97 / 26.00, bf16 25.87); the weight-only head decodes
# one stream no faster than the packed bf16 one and 32 streams 1.4x slower, the int8 GEMM 1.3x and 1.4x faster than
# the weight-only head. int4 for the head: 4x fewer bytes than bf16, +6% perplexity.
_LM_HEAD_FORMAT = "w8a8"


# Under --quantize int4, these projections are requantized to int8 instead, as llama.cpp's Q4_K_M gives attn_v more
# bits. On Gemma 3 270M (default model, bf16, benchmarks/data/perplexity.txt) they hold 6% of the decoder weights and
# cost half of int4's loss: perplexity +15.6% over bf16 with them in int4, +7.0% in int8, for 0.324x the bf16 decoder
# bytes instead of 0.313x. (int8 also for the down projections of the 9 blocks llama.cpp gives more bits: +5.1%, 0.346x;
# not taken, --quantize int4 is for memory.)
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
    return loaded


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
