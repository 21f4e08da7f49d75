"""HF model folders and Hub ids -> a built model with its weights, in one dtype, on one device."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from loraserve.errors import ModelLoadError
from loraserve.models.base import CausalLM
from loraserve.models.registry import model_class

# What a served model needs from a Hub repo; other weight formats (.bin, .pt, .gguf variants) are never fetched.
_MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def resolve_model_dir(
    model_id: str, revision: str | None = None, token: str | None = None, cache_dir: str | None = None
) -> Path:
    """A local folder as is; otherwise a Hub snapshot (HF_HUB_OFFLINE and HF_ENDPOINT are honoured by huggingface_hub,
    which also draws the download progress bars)."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local
    try:
        return Path(snapshot_download(model_id, revision=revision, token=token, cache_dir=cache_dir,
                                      allow_patterns=_MODEL_FILES))
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises many types; all mean "cannot get the model"
        raise ModelLoadError(f"cannot load model {model_id!r}: {error}") from error


@contextlib.contextmanager
def _building(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Create parameters directly in `dtype` on `device`, so a large model is never materialized twice."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """An uninitialized model for `config`; weights come from `load_weights`."""
    with _building(dtype, device):
        model = model_class(config)(config)
    return model.eval()


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) over every shard listed in the index, or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(f"{model_dir} holds no model.safetensors or model.safetensors.index.json")
    for file in files:
        with safe_open(model_dir / file, framework="pt") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device) -> CausalLM:
    config = AutoConfig.from_pretrained(model_dir)
    model = build_model(config, dtype, device)
    model.load_weights(iter_safetensors(model_dir))
    return model
