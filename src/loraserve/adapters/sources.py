"""Where an adapter's files come from: a local folder, the Hugging Face Hub or S3 (any S3-compatible store)."""

from __future__ import annotations

from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from huggingface_hub import HfApi, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from loraserve.errors import AdapterLoadError, AdapterNotFound, InvalidRequest

SOURCES = ("hub", "local", "s3")
_ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "tokenizer_config.json",
                  "chat_template.jinja"]


def resolve_adapter(
    adapter_id: str, source: str, token: str | None, cache_dir: Path, s3_endpoint_url: str | None = None
) -> Path:
    """The local folder holding `adapter_id`'s PEFT files, downloading from the Hub (with `token`) or S3 if needed."""
    if source == "s3":
        return _from_s3(adapter_id, cache_dir / "s3", s3_endpoint_url)
    if source == "local":
        path = Path(adapter_id).expanduser()
        if not path.is_dir():
            raise AdapterNotFound(f"adapter {adapter_id!r}: no such local folder")
        return path
    if source != "hub":
        raise InvalidRequest(f"`adapter_source` must be one of {', '.join(SOURCES)}; got {source!r}")
    revision = check_hub_access(adapter_id, token)
    try:
        # token=False: never let huggingface_hub fall back to the server's HF_TOKEN behind the request's back
        path = snapshot_download(adapter_id, revision=revision, token=token or False, cache_dir=str(cache_dir),
                                 allow_patterns=_ADAPTER_FILES)
        return Path(path)
    except (RepositoryNotFoundError, EntryNotFoundError, LocalEntryNotFoundError) as error:
        raise AdapterNotFound(f"adapter {adapter_id!r} not found on the Hub: {error}") from error
    except Exception as error:  # noqa: BLE001 - network and server failures of every kind
        raise AdapterLoadError(f"adapter {adapter_id!r}: download failed: {error}") from error


def check_hub_access(adapter_id: str, token: str | None) -> str | None:
    """The commit of `adapter_id`'s main branch as `token` sees it; raises `AdapterNotFound` if it cannot see it.

    An explicit metadata call, because `snapshot_download` answers a refused request from the local cache when the
    files are there (downloaded earlier with someone else's token). Offline (`HF_HUB_OFFLINE`), nothing can be asked:
    None, and the cache is trusted.
    """
    try:
        return HfApi().model_info(adapter_id, revision="main", token=token or False).sha
    except OfflineModeIsEnabled:
        return None
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise AdapterNotFound(f"adapter {adapter_id!r} not found on the Hub, or not visible with the request's "
                              f"token: {error}") from error
    except Exception as error:  # noqa: BLE001 - network and server failures of every kind
        raise AdapterLoadError(f"adapter {adapter_id!r}: the Hub did not answer: {error}") from error


def _from_s3(adapter_id: str, cache_dir: Path, endpoint_url: str | None) -> Path:
    """`s3://bucket/prefix` (or `bucket/prefix`): every object under the prefix, mirrored into the cache."""
    bucket, _, prefix = adapter_id.removeprefix("s3://").partition("/")
    if not bucket or not prefix:
        raise InvalidRequest(f"an S3 adapter_id looks like s3://bucket/prefix; got {adapter_id!r}")
    target = cache_dir / bucket / prefix
    client = boto3.client("s3", endpoint_url=endpoint_url)
    try:
        keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                            Prefix=prefix.rstrip("/") + "/")
                for item in page.get("Contents", [])]
        if not keys:
            raise AdapterNotFound(f"adapter {adapter_id!r}: no objects under s3://{bucket}/{prefix}")
        for key in keys:
            destination = target / key[len(prefix.rstrip("/")) + 1 :]
            destination.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(destination))
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "NoSuchKey", "404", "AccessDenied", "403"):
            raise AdapterNotFound(f"adapter {adapter_id!r} not found on S3: {error}") from error
        raise AdapterLoadError(f"adapter {adapter_id!r}: S3 download failed: {error}") from error
    except BotoCoreError as error:
        raise AdapterLoadError(f"adapter {adapter_id!r}: S3 download failed: {error}") from error
    return target


def cached_on_disk(cache_dir: Path) -> list[tuple[str, str, int]]:
    """(source, adapter_id, bytes) of every adapter downloaded into `cache_dir`: Hub repos (huggingface_hub's own
    cache scan) and S3 prefixes mirrored under `cache_dir/s3`. Local folders are not listed: they are the user's."""
    found = []
    if cache_dir.is_dir():
        for repo in scan_cache_dir(cache_dir).repos:
            if repo.repo_type == "model":
                found.append(("hub", repo.repo_id, repo.size_on_disk))
    s3_root = cache_dir / "s3"
    for config in sorted(s3_root.glob("**/adapter_config.json")) if s3_root.is_dir() else []:
        folder = config.parent
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        found.append(("s3", "s3://" + folder.relative_to(s3_root).as_posix(), size))
    return found
