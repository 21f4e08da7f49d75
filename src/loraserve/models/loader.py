"""HF model folders and Hub ids -> a built model with its weights, in one dtype, on one device.

Loading is split in two so every weight source shares the model construction: `build_model` makes an empty model
for a transformers config, and `load_weights` fills it from `(checkpoint name, tensor)` pairs. `load_model` feeds it
safetensors; the GGUF reader (models/gguf.py) feeds it dequantized tensors under the same names.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from loraserve.errors import ModelLoadError
from loraserve.models.base import CausalLM
from loraserve.models.registry import model_class

# Everything a served model needs besides its weights: config.json, generation_config.json, the tokenizer
# (tokenizer.json / tokenizer_config.json / tokenizer.model / vocab.json + merges.txt), the chat template (.jinja or
# .json) and the safetensors index. Weights are fetched in a second pass, exactly the shards the index lists, so
# repos that also ship other formats (Mistral's consolidated.safetensors, .bin, .gguf) never cost a download.
_METADATA_FILES = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_SINGLE = "model.safetensors"
_COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_model_dir(
    model_id: str, revision: str | None = None, token: str | None = None, cache_dir: str | None = None
) -> Path:
    """A local folder as is; otherwise a Hub snapshot of the files `load_model` and the tokenizer read.

    huggingface_hub supplies the rest: HF_TOKEN when `token` is None, HF_HUB_OFFLINE (served from the cache),
    HF_ENDPOINT, HF_HUB_CACHE when `cache_dir` is None, and the download progress bars.
    """
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local
    if _looks_like_path(model_id):
        raise ModelLoadError(f"model folder {model_id!r} does not exist")
    try:
        folder = Path(_download(model_id, revision, token, cache_dir, _METADATA_FILES))
        # Pin the second pass to the commit of the first, so a push in between cannot mix two revisions.
        pinned = folder.name if _COMMIT.fullmatch(folder.name) else revision
        index = folder / _SAFETENSORS_INDEX
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
            _SAFETENSORS_SINGLE
        ]
        return Path(_download(model_id, pinned, token, cache_dir, shards))
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises many types; all mean "cannot get the model"
        raise ModelLoadError(f"cannot load model {model_id!r}: {error}") from error


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else the user typed is meant as a folder."""
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or Path(model_id).exists()


def _download(
    model_id: str, revision: str | None, token: str | None, cache_dir: str | None, patterns: list[str]
) -> str:
    return snapshot_download(model_id, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=patterns)


@contextlib.contextmanager
def _building(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Create parameters directly in `dtype` on `device`, so a large model is never materialized twice.

    Model code allocates its weights with `torch.empty` (layers/linear.py), so building costs no initialization;
    rotary tables are computed in explicit float32 and are unaffected by the default dtype.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """An uninitialized model for `config` (the class its `architectures` name); weights come from `load_weights`."""
    cls = model_class(config)
    with _building(dtype, device):
        model = cls(config)
    return model.eval()


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over every shard the index lists, or the single file; one tensor in memory at a time."""
    index = model_dir / _SAFETENSORS_INDEX
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / _SAFETENSORS_SINGLE).exists():
        files = [_SAFETENSORS_SINGLE]
    else:
        raise ModelLoadError(
            f"{model_dir} holds neither {_SAFETENSORS_SINGLE} nor {_SAFETENSORS_INDEX} (only safetensors is read)"
        )
    for file in files:
        if not (model_dir / file).is_file():
            raise ModelLoadError(f"{model_dir}: shard {file} listed in {_SAFETENSORS_INDEX} is missing")
        with safe_open(model_dir / file, framework="pt") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """Build the model `model_dir/config.json` describes and fill it from the folder's safetensors."""
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot read the model config in {model_dir}: {error}") from error
    model = build_model(config, dtype, device)
    model.load_weights(iter_safetensors(model_dir))
    return model
