"""GGUF files -> our models: config from the metadata, llama.cpp tensor names -> HF names, weights.

Everything mirrors transformers' own GGUF loader (`transformers/integrations/ggml.py`,
`transformers/modeling_gguf_pytorch_utils.py`), so both read one file as the same model:

- the config comes from the same metadata keys into the same config class (its defaults fill the rest: Gemma 3's
  sliding/global layer pattern, local rope base, `query_pre_attn_scalar`);
- every tensor is dequantized by `gguf.quants.dequantize` to float32, corrected in float32, then cast to the model
  dtype when copied into the parameter; except that a linear layer to be quantized to int4 whose tensor is Q4_0,
  Q4_1 or Q4_K takes the file's own codes (quant/ggml.py): no float copy, no second rounding;
- llama.cpp's conversion transform is undone: Gemma stores every `*norm.weight` as `w + 1` (transformers'
  `Gemma2TensorProcessor` subtracts 1 for gemma2 and gemma3). Llama-arch files would also need their q/k rows
  un-permuted (transformers' `LlamaTensorProcessor`); that comes with the first llama-arch entry.

Only `gemma3` is in `_ARCHITECTURES` today; another family is one table entry (config class, metadata keys, block
tensor names, transforms) once its model class and a parity test exist. Any other architecture raises
`UnsupportedModel`.

The tokenizer is converted once by transformers (about 20 s for Gemma's 262k vocabulary) and cached on disk; a chat
template is attached from the file when it has one, else from `loraserve/templates/<arch>.jinja`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer, Gemma3TextConfig, PretrainedConfig, PreTrainedTokenizerFast

from loraserve.errors import ModelLoadError, UnsupportedModel
from loraserve.layers.linear import Linear
from loraserve.models.base import CausalLM
from loraserve.models.loader import build_model
from loraserve.quant.ggml import INT4_TYPES, int4_from_ggml

logger = logging.getLogger(__name__)

# "<arch>.<key>" metadata -> config field, as transformers' GGUF_CONFIG_MAPPING["gemma2" / "gemma3"] maps them.
# (llama/mistral map `rope.dimension_count` to head_dim instead of `attention.key_length`; qwen2 leaves the sizes
# to the config class. Copy the entry from ggml.py when adding a family.)
_GEMMA_CONFIG_KEYS = {
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
    "vocab_size": "vocab_size",
}
# "tokenizer.ggml.<key>" -> config field (transformers' GGUF_TO_TRANSFORMERS_MAPPING["tokenizer"])
_TOKEN_ID_KEYS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
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
# (Llama-style blocks would map attn_norm -> input_layernorm and ffn_norm -> post_attention_layernorm.)
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class GGUFArchitecture:
    config_class: type[PretrainedConfig]
    hf_architecture: str  # the `architectures` entry our registry maps to a model class
    config_keys: dict[str, str]
    block_names: dict[str, str]
    norm_shift: float = 0.0  # llama.cpp stored every `*norm.weight` as w + norm_shift (Gemma: 1)
    end_of_turn_tokens: tuple[str, ...] = ()  # chat-turn terminators that end generation besides <eos>
    chat_template: str | None = None  # shipped template (templates/<name>.jinja) when the file carries none


_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "gemma3": GGUFArchitecture(
        Gemma3TextConfig, "Gemma3ForCausalLM", _GEMMA_CONFIG_KEYS, _GEMMA3_BLOCK_NAMES,
        norm_shift=1.0, end_of_turn_tokens=("<end_of_turn>",), chat_template="gemma3",
    ),
}


def read_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot read GGUF file {path}: {error}") from error


def _field(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(reader: gguf.GGUFReader) -> tuple[str, GGUFArchitecture]:
    name = _field(reader, "general.architecture")
    if name not in _ARCHITECTURES:
        raise UnsupportedModel(f"GGUF architecture {name!r} is not supported; supported: {sorted(_ARCHITECTURES)}")
    return name, _ARCHITECTURES[name]


def gguf_config(reader: gguf.GGUFReader) -> PretrainedConfig:
    """The transformers config of the file, equal (to_dict) to `AutoConfig.from_pretrained(dir, gguf_file=...)`
    apart from `architectures` (set here for our registry) and transformers' name fields."""
    name, arch = gguf_architecture(reader)
    values = {}
    for key, field_name in arch.config_keys.items():
        value = _field(reader, f"{name}.{key}")
        if value is not None:
            values[field_name] = value
    for key, field_name in _TOKEN_ID_KEYS.items():
        value = _field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            values[field_name] = value
    if "vocab_size" not in values:
        values["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    values["tie_word_embeddings"] = all(tensor.name != "output.weight" for tensor in reader.tensors)
    config = arch.config_class(**values)
    config.architectures = [arch.hf_architecture]
    return config


def hf_tensor_name(gguf_name: str, arch: GGUFArchitecture) -> str:
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in arch.block_names:
        return f"model.layers.{parts[1]}.{arch.block_names[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no counterpart in the model")


def gguf_tensors(reader: gguf.GGUFReader, config: PretrainedConfig, skip: Collection[str] = ()
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the file but those named in `skip`, llama.cpp's transforms
    undone.

    GGUF lists dims innermost first; numpy (and torch's Linear.weight `[out, in]`) outermost first.
    """
    _, arch = gguf_architecture(reader)
    for tensor in reader.tensors:
        if tensor.name in skip:
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        values = values.reshape([int(d) for d in reversed(tensor.shape.tolist())])
        name = tensor.name
        if arch.norm_shift and name.endswith("norm.weight"):
            values = values - np.float32(arch.norm_shift)
        yield hf_tensor_name(name, arch), torch.from_numpy(np.ascontiguousarray(values))


def load_gguf_model(path: Path, dtype: torch.dtype, device: torch.device,
                    takes_int4: Callable[[str], bool] = lambda name: False) -> CausalLM:
    """Our model for the file, float weights cast to `dtype` on `device`. The linear layers `takes_int4` names (by
    module name) take a Q4_0/Q4_1/Q4_K tensor of the file as int4 codes directly."""
    started = time.perf_counter()
    reader = read_gguf(path)
    parsed = time.perf_counter()
    config = gguf_config(reader)
    _drop_vocabulary(reader)
    model = build_model(config, dtype, device)
    taken = _take_int4_blocks(reader, model, takes_int4, device)
    model.load_weights(gguf_tensors(reader, config, skip=taken))
    logger.info("loaded %s in %.1f s (metadata %.1f s, weights %.1f s; %d int4 weights from the file's 4-bit blocks)",
                Path(path).name, time.perf_counter() - started, parsed - started, time.perf_counter() - parsed,
                len(taken))
    return model


def _drop_vocabulary(reader: gguf.GGUFReader) -> None:
    """Free the reader's parsed vocabulary (millions of small numpy objects for a 262k-token one) once the config
    has what it needs and before the weights load: objects allocated while loading would otherwise pin the memory
    they sit in, and the process would stay larger by a sizeable share of it. The tokenizer is read separately."""
    for key in [key for key in reader.fields if key.startswith("tokenizer.ggml.")]:
        del reader.fields[key]
    gc.collect()


def _take_int4_blocks(reader: gguf.GGUFReader, model: CausalLM, takes_int4: Callable[[str], bool],
                      device: torch.device) -> set[str]:
    """Give each linear layer `takes_int4` names whose tensor is in a 4-bit block format its codes directly, before
    `load_weights` (which then no longer expects that weight); returns the GGUF names taken."""
    _, arch = gguf_architecture(reader)
    modules = dict(model.named_modules())
    taken = set()
    for tensor in reader.tensors:
        if tensor.tensor_type not in INT4_TYPES:
            continue
        module_name, _, kind = hf_tensor_name(tensor.name, arch).rpartition(".")
        linear = modules.get(module_name)
        if kind != "weight" or not isinstance(linear, Linear) or not takes_int4(module_name):
            continue
        shape = (int(tensor.shape[1]), int(tensor.shape[0]))  # GGUF lists dims innermost first
        if shape != (linear.out_features, linear.in_features):
            raise ModelLoadError(f"{module_name}.weight: file shape {shape} != model shape "
                                 f"{(linear.out_features, linear.in_features)}")
        linear.set_quantized(int4_from_ggml(tensor.data, tensor.tensor_type, shape, device))
        taken.add(tensor.name)
    return taken


# ---------------------------------------------------------------------------------------------------- tokenizer

_CACHE_FORMAT = "loraserve-gguf-tokenizer-1"  # part of the cache key: bump when the cached layout changes
_SIDECAR = "loraserve.json"  # written last; its presence marks a complete cache entry


def gguf_tokenizer(path: Path, cache_dir: Path) -> PreTrainedTokenizerFast:
    """The file's tokenizer with a chat template. Converted by transformers on first use (~20 s for a 262k
    vocabulary), saved under `cache_dir/<file key>/`, loaded from there afterwards (~4 s)."""
    path = Path(path)
    target = Path(cache_dir) / _file_key(path)
    if not (target / _SIDECAR).exists():
        _convert_tokenizer(path, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    if tokenizer.chat_template is None:
        architecture = json.loads((target / _SIDECAR).read_text())["architecture"]
        template = _ARCHITECTURES[architecture].chat_template if architecture in _ARCHITECTURES else None
        if template is not None:
            tokenizer.chat_template = shipped_chat_template(template)
    return tokenizer


def _convert_tokenizer(path: Path, target: Path) -> None:
    logger.info("converting the tokenizer of %s (once; cached in %s)", path.name, target)
    reader = read_gguf(path)
    architecture = _field(reader, "general.architecture")
    file_template = _field(reader, "tokenizer.chat_template")
    del reader
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot convert the tokenizer of {path}: {error}") from error
    if file_template:
        tokenizer.chat_template = file_template  # transformers' GGUF conversion drops it
    # Write into a private directory and rename it into place: a crash or a concurrent loader never sees half a cache.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer.save_pretrained(staging)
        (staging / _SIDECAR).write_text(json.dumps({"architecture": architecture, "source": str(path)}))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _SIDECAR).exists():  # a stale, incomplete entry: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _file_key(path: Path) -> str:
    """The file's size and a hash of its first MiB (header and the start of the vocabulary) and the cache format."""
    with path.open("rb") as handle:
        head = handle.read(1 << 20)
    digest = hashlib.sha256(_CACHE_FORMAT.encode() + head).hexdigest()[:16]
    return f"{path.stat().st_size}-{digest}"


def shipped_chat_template(name: str) -> str:
    return files("loraserve").joinpath("templates", f"{name}.jinja").read_text()


# ---------------------------------------------------------------------------------------------------- together


def eos_token_ids(config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast) -> set[int]:
    """Every id that ends generation: the file's <eos> plus the family's end-of-turn tokens (Gemma 3's
    generation_config.json lists <eos> 1 and <end_of_turn> 106; the GGUF records only the first)."""
    ids: set[int] = set()
    for candidate in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif candidate:
            ids.update(candidate)
    vocab = tokenizer.get_vocab()
    for arch in _ARCHITECTURES.values():
        if arch.config_class.model_type == config.model_type:
            ids.update(vocab[token] for token in arch.end_of_turn_tokens if token in vocab)
    return ids


@dataclass
class GGUFModel:
    model: CausalLM
    tokenizer: PreTrainedTokenizerFast
    eos_token_ids: set[int]


def load_gguf(path: Path, dtype: torch.dtype, device: torch.device, tokenizer_cache: Path,
              takes_int4: Callable[[str], bool] = lambda name: False) -> GGUFModel:
    """Model, tokenizer (cached in `tokenizer_cache`) and EOS ids of a GGUF file; `takes_int4` as in
    `load_gguf_model`."""
    model = load_gguf_model(path, dtype, device, takes_int4)
    tokenizer = gguf_tokenizer(path, tokenizer_cache)
    return GGUFModel(model, tokenizer, eos_token_ids(model.config, tokenizer))
