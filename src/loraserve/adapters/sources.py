"""Where an adapter's files come from: a local folder or the Hugging Face Hub (S3 is still to come)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from loraserve.errors import AdapterLoadError, AdapterNotFound, InvalidRequest

SOURCES = ("hub", "local")
_ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "tokenizer_config.json"]


def resolve_adapter(adapter_id: str, source: str, token: str | None, cache_dir: Path) -> Path:
    """The local folder holding `adapter_id`'s PEFT files, downloading from the Hub with `token` if needed."""
    if source == "local":
        path = Path(adapter_id).expanduser()
        if not path.is_dir():
            raise AdapterNotFound(f"adapter {adapter_id!r}: no such local folder")
        return path
    if source != "hub":
        raise InvalidRequest(f"`adapter_source` must be one of {', '.join(SOURCES)}; got {source!r}")
    try:
        # token=False: never let huggingface_hub fall back to the server's HF_TOKEN behind the request's back
        path = snapshot_download(adapter_id, token=token or False, cache_dir=str(cache_dir),
                                 allow_patterns=_ADAPTER_FILES)
        return Path(path)
    except (RepositoryNotFoundError, EntryNotFoundError, LocalEntryNotFoundError) as error:
        raise AdapterNotFound(f"adapter {adapter_id!r} not found on the Hub: {error}") from error
    except Exception as error:  # noqa: BLE001 - network and server failures of every kind
        raise AdapterLoadError(f"adapter {adapter_id!r}: download failed: {error}") from error
