"""Where an adapter's files come from: a local folder, the Hugging Face Hub or S3 (any S3-compatible store).

What a request may name is bounded by an `AdapterSourcePolicy`: local adapters only inside the configured roots
(after symlinks), S3 buckets and Hub organisations from allow-lists, a size cap, and pickled weights only when the
operator allows them. Errors name what the request gave (the adapter id) and a short reason; they never echo a
server folder, nor the Hub's or the S3 store's internal URLs.

Downloads are bounded in time: every network read waits at most the download timeout, and an S3 download that is
still running when that much time has passed since it began stops there (a store that drips bytes would otherwise
hold its thread for ever). The Hub's reads are bounded by huggingface_hub's own per-read timeout.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from huggingface_hub import HfApi, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from loraserve.adapters.peft import DEFAULT_MAX_ADAPTER_BYTES, PICKLE_FLAG
from loraserve.errors import AdapterLoadError, AdapterNotFound, InvalidRequest

logger = logging.getLogger(__name__)

SOURCES = ("hub", "local", "s3")
_ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "tokenizer_config.json",
                  "chat_template.jinja"]
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PARTIAL = ".partial"  # under cache_dir/s3: downloads in progress (never listed as cached)
_OLD = ".replaced-"  # `<adapter folder>.replaced-<uuid>`: a previous download being swapped out
_MAX_S3_ENTRIES = 10_000  # direct children of an S3 adapter prefix listed before giving up
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_S3_CHUNK = 1 << 20
DEFAULT_DOWNLOAD_TIMEOUT = 120.0  # seconds (--adapter-download-timeout)


@dataclass(frozen=True)
class AdapterSourcePolicy:
    """What requests may load adapters from. The defaults keep the open behaviour of a private server (local folders
    anywhere, every bucket and Hub organisation) but refuse pickled weights.

    adapter_roots: local adapter ids resolve inside these folders only (relative ids against each root in turn,
        absolute ids must lie inside one, after symlinks); empty: local folders anywhere.
    allowed_s3_buckets / allowed_hub_orgs: empty means all; Hub organisations compare case-insensitively, as the
        Hub does.
    max_adapter_bytes: the most an adapter's weights may take, checked before downloading where the source lists
        sizes, and again when the files are read.
    allow_pickle: read `adapter_model.bin` (with `torch.load(weights_only=True)`) when there is no safetensors file.
    """

    adapter_roots: tuple[Path, ...] = ()
    allowed_s3_buckets: tuple[str, ...] = ()
    allowed_hub_orgs: tuple[str, ...] = ()
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter_roots", tuple(Path(root).expanduser() for root in self.adapter_roots))
        object.__setattr__(self, "allowed_s3_buckets", tuple(self.allowed_s3_buckets))
        object.__setattr__(self, "allowed_hub_orgs", tuple(self.allowed_hub_orgs))
        if self.max_adapter_bytes <= 0:
            raise ValueError(f"max_adapter_bytes must be positive, not {self.max_adapter_bytes}")

    def hub_org_allowed(self, repo_id: str) -> bool:
        if not self.allowed_hub_orgs:
            return True
        org, slash, _ = repo_id.partition("/")
        return bool(slash) and org.casefold() in {o.casefold() for o in self.allowed_hub_orgs}

    def bucket_allowed(self, bucket: str) -> bool:
        return not self.allowed_s3_buckets or bucket in self.allowed_s3_buckets


_OPEN = AdapterSourcePolicy()


def download_timeout_error(adapter_id: str, timeout: float) -> AdapterLoadError:
    return AdapterLoadError(f"adapter {adapter_id!r}: the download did not finish within {timeout:g} s "
                            "(--adapter-download-timeout)")


def resolve_adapter(
    adapter_id: str, source: str, token: str | None, cache_dir: Path, s3_endpoint_url: str | None = None, *,
    policy: AdapterSourcePolicy = _OPEN, timeout: float = DEFAULT_DOWNLOAD_TIMEOUT,
) -> Path:
    """The local folder holding `adapter_id`'s PEFT files, downloading from the Hub (with `token`) or S3 if needed,
    within what `policy` allows and within `timeout` seconds per network read (for S3, in all)."""
    if source == "s3":
        return _from_s3(adapter_id, cache_dir / "s3", s3_endpoint_url, policy, timeout)
    if source == "local":
        return _local(adapter_id, policy)
    if source != "hub":
        raise InvalidRequest(f"`adapter_source` must be one of {', '.join(SOURCES)}; got {source!r}")
    if not policy.hub_org_allowed(adapter_id):
        raise AdapterNotFound(f"adapter {adapter_id!r}: this server loads Hub adapters only from the organisations "
                              f"{', '.join(policy.allowed_hub_orgs)}")
    info = _hub_info(adapter_id, token, timeout, files_metadata=True)
    patterns = list(_ADAPTER_FILES)
    if info is not None:
        _check_hub_files(adapter_id, info, policy)
    if not policy.allow_pickle:
        patterns.remove("adapter_model.bin")
    try:
        # token=False: never let huggingface_hub fall back to the server's HF_TOKEN behind the request's back
        path = snapshot_download(adapter_id, revision=info.sha if info is not None else None, token=token or False,
                                 cache_dir=str(cache_dir), allow_patterns=patterns, etag_timeout=timeout)
        return Path(path)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, LocalEntryNotFoundError,
            HFValidationError) as error:
        logger.info("Hub adapter %r not found: %s", adapter_id, error)
        raise AdapterNotFound(f"adapter {adapter_id!r} not found on the Hub ({_hub_reason(error)})") from None
    except Exception as error:  # noqa: BLE001 - network and server failures of every kind
        logger.warning("downloading Hub adapter %r failed: %s", adapter_id, error)
        raise AdapterLoadError(f"adapter {adapter_id!r}: download from the Hub failed ({_hub_reason(error)})") from None


def check_hub_access(adapter_id: str, token: str | None, *, policy: AdapterSourcePolicy = _OPEN,
                     timeout: float = DEFAULT_DOWNLOAD_TIMEOUT) -> str | None:
    """The commit of `adapter_id`'s main branch as `token` sees it; raises `AdapterNotFound` if it cannot see it.

    An explicit metadata call, because `snapshot_download` answers a refused request from the local cache when the
    files are there (downloaded earlier with someone else's token). Offline (`HF_HUB_OFFLINE`), nothing can be asked:
    None, and the cache is trusted.
    """
    if not policy.hub_org_allowed(adapter_id):
        raise AdapterNotFound(f"adapter {adapter_id!r}: this server loads Hub adapters only from the organisations "
                              f"{', '.join(policy.allowed_hub_orgs)}")
    info = _hub_info(adapter_id, token, timeout)
    return None if info is None else info.sha


def _hub_info(adapter_id: str, token: str | None, timeout: float,  # noqa: ANN202 - huggingface ModelInfo
              files_metadata: bool = False):
    try:
        return HfApi().model_info(adapter_id, revision="main", token=token or False, timeout=timeout,
                                  files_metadata=files_metadata)
    except OfflineModeIsEnabled:
        return None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, HFValidationError) as error:
        # the full error names the Hub's URL: logged for the operator, not returned to the request
        logger.info("Hub adapter %r not visible: %s", adapter_id, error)
        raise AdapterNotFound(f"adapter {adapter_id!r} not found on the Hub, or not visible with the request's "
                              f"token ({_hub_reason(error)})") from None
    except Exception as error:  # noqa: BLE001 - network and server failures of every kind
        if getattr(getattr(error, "response", None), "status_code", None) in (401, 403):  # a token the Hub refuses
            logger.info("Hub adapter %r refused: %s", adapter_id, error)
            raise AdapterNotFound(f"adapter {adapter_id!r} not found on the Hub, or not visible with the request's "
                                  f"token ({_hub_reason(error)})") from None
        logger.warning("the Hub did not answer for adapter %r: %s", adapter_id, error)
        raise AdapterLoadError(f"adapter {adapter_id!r}: the Hub did not answer ({_hub_reason(error)})") from None


def _hub_reason(error: Exception) -> str:
    """A short reason for a Hub failure without its URL: the HTTP status where there is one, else the error kind."""
    if isinstance(error, HFValidationError):
        return "not a valid repository id"
    if isinstance(error, GatedRepoError):
        return "gated repository"
    if isinstance(error, RevisionNotFoundError):
        return "no such revision"
    if isinstance(error, LocalEntryNotFoundError):
        return "the Hub is unreachable and the files are not cached"
    if isinstance(error, EntryNotFoundError):
        return "missing file"
    if isinstance(error, RepositoryNotFoundError):
        return "no such repository"
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return f"HTTP {status}" if status is not None else type(error).__name__


def _check_hub_files(adapter_id: str, info: object, policy: AdapterSourcePolicy) -> None:
    """From the repo's file list: a pickle-only adapter without `allow_pickle`, and the size cap (where the Hub
    gives sizes), are refused before anything is downloaded."""
    siblings = {s.rfilename: s for s in (getattr(info, "siblings", None) or [])}
    if not siblings:
        return
    wanted = [f for f in _ADAPTER_FILES if f in siblings]
    if "adapter_model.safetensors" not in siblings and "adapter_model.bin" in siblings and not policy.allow_pickle:
        raise AdapterLoadError(f"adapter {adapter_id!r} ships its weights only as adapter_model.bin, a pickle; this "
                               f"server reads pickled adapters only when started with {PICKLE_FLAG}")
    if not policy.allow_pickle or "adapter_model.safetensors" in siblings:
        wanted = [f for f in wanted if f != "adapter_model.bin"]
    total = sum(getattr(siblings[f], "size", None) or 0 for f in wanted)
    if total > policy.max_adapter_bytes:
        raise AdapterLoadError(f"adapter {adapter_id!r} is {total} bytes, over this server's limit of "
                               f"{policy.max_adapter_bytes} bytes per adapter")


def _local(adapter_id: str, policy: AdapterSourcePolicy) -> Path:
    if not policy.adapter_roots:  # open: any folder the server can read (a private server's behaviour)
        path = Path(adapter_id).expanduser()
        try:
            found = "\0" not in adapter_id and path.is_dir()
        except (OSError, ValueError):
            found = False
        if not found:
            raise AdapterNotFound(f"adapter {adapter_id!r}: no such local folder")
        return path
    # one message for every refusal, so that a request cannot tell which server folders exist
    refused = AdapterNotFound(f"adapter {adapter_id!r}: no such adapter under this server's adapter roots")
    if not adapter_id or "\0" in adapter_id:
        raise refused
    roots = []
    for root in policy.adapter_roots:
        try:
            roots.append(root.resolve(strict=True))
        except (OSError, RuntimeError):
            continue  # a root that does not exist (yet) holds nothing
    requested = Path(adapter_id)  # never expanduser: `~` is just a folder name under a root
    candidates = [requested] if requested.is_absolute() else [root / requested for root in roots]
    for candidate in candidates:
        try:
            resolved = candidate.resolve(strict=True)
            if not resolved.is_dir() or not any(resolved.is_relative_to(root) for root in roots):
                continue
            # the files read from it must stay inside the roots too: a symlinked chat template or weights file
            # pointing out would otherwise read any file the server can
            for name in _ADAPTER_FILES:
                file = resolved / name
                if (file.exists() or file.is_symlink()) and not any(
                        file.resolve(strict=True).is_relative_to(root) for root in roots):
                    raise refused
        except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, unreadable
            continue
        return resolved
    raise refused


def _from_s3(adapter_id: str, cache_dir: Path, endpoint_url: str | None, policy: AdapterSourcePolicy,
             timeout: float) -> Path:
    """`s3://bucket/prefix` (or `bucket/prefix`): the adapter files directly under the prefix, downloaded into a
    temporary folder and moved into the cache in one rename, so a partial download is never taken for an adapter."""
    deadline = time.monotonic() + timeout
    bucket, _, prefix = adapter_id.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/")
    if not bucket or not prefix:
        raise InvalidRequest(f"an S3 adapter_id looks like s3://bucket/prefix; got {adapter_id!r}")
    if not _BUCKET.fullmatch(bucket) or not _safe_relative(prefix):
        raise InvalidRequest(f"adapter {adapter_id!r}: not a usable S3 bucket and prefix (no `.` or `..` segments, "
                             "empty segments or backslashes)")
    if not policy.bucket_allowed(bucket):
        raise AdapterNotFound(f"adapter {adapter_id!r}: this server does not load adapters from bucket {bucket!r}")
    target = cache_dir / bucket / prefix
    try:
        client = _s3_client(endpoint_url, timeout)
        sizes = _list_s3_adapter(adapter_id, client, bucket, prefix)
        if not sizes:
            raise AdapterNotFound(f"adapter {adapter_id!r}: no objects under s3://{bucket}/{prefix}/")
        if "adapter_model.safetensors" in sizes:
            sizes.pop("adapter_model.bin", None)  # never fetch a pickle that would not be read
        elif "adapter_model.bin" in sizes and not policy.allow_pickle:
            raise AdapterLoadError(f"adapter {adapter_id!r} ships its weights only as adapter_model.bin, a pickle; "
                                   f"this server reads pickled adapters only when started with {PICKLE_FLAG}")
        total = sum(sizes.values())
        if total > policy.max_adapter_bytes:
            raise AdapterLoadError(f"adapter {adapter_id!r} is {total} bytes, over this server's limit of "
                                   f"{policy.max_adapter_bytes} bytes per adapter")
        partial_root = cache_dir / _PARTIAL
        partial_root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=partial_root))
        try:
            downloaded = 0
            for name in sizes:
                downloaded = _download_s3_object(client, bucket, f"{prefix}/{name}", partial / name, downloaded,
                                                 deadline, adapter_id, policy, timeout)
            _move_into_place(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        logger.info("S3 adapter %r: %s", adapter_id, error)
        if code in ("NoSuchBucket", "NoSuchKey", "404", "AccessDenied", "403"):
            raise AdapterNotFound(f"adapter {adapter_id!r} not found on S3 ({code})") from None
        raise AdapterLoadError(f"adapter {adapter_id!r}: S3 download failed ({code or 'error'})") from None
    except (BotoCoreError, Boto3Error) as error:
        logger.warning("S3 adapter %r: %s", adapter_id, error)
        raise AdapterLoadError(f"adapter {adapter_id!r}: S3 download failed ({type(error).__name__})") from None
    except OSError as error:  # the cache folder: disk full, permissions
        logger.warning("S3 adapter %r: writing the cache failed: %s", adapter_id, error)
        raise AdapterLoadError(f"adapter {adapter_id!r}: could not store the download "
                               f"({error.strerror or type(error).__name__})") from None
    return target


_s3_clients: dict[tuple[str | None, float], object] = {}
_s3_clients_lock = threading.Lock()


def _s3_client(endpoint_url: str | None, timeout: float):  # noqa: ANN202 - botocore's generated S3 client class
    """One client per endpoint and timeout, shared by every download thread: a client is thread-safe once made, but
    making clients from boto3's default session in several threads at once is not."""
    with _s3_clients_lock:
        client = _s3_clients.get((endpoint_url, timeout))
        if client is None:
            config = Config(connect_timeout=timeout, read_timeout=timeout,
                            retries={"max_attempts": 3, "mode": "standard"})
            client = _s3_clients[(endpoint_url, timeout)] = boto3.client("s3", endpoint_url=endpoint_url,
                                                                         config=config)
        return client


def _download_s3_object(client: object, bucket: str, key: str, destination: Path, downloaded: int, deadline: float,
                        adapter_id: str, policy: AdapterSourcePolicy, timeout: float) -> int:
    """Stream one object to `destination`, stopping once the adapter's bytes pass the size cap (the objects changed
    since they were listed) or the download passes its deadline; returns the adapter's bytes so far."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        with destination.open("wb") as out:
            for chunk in body.iter_chunks(_S3_CHUNK):
                downloaded += len(chunk)
                if downloaded > policy.max_adapter_bytes:
                    raise AdapterLoadError(f"adapter {adapter_id!r} is over this server's limit of "
                                           f"{policy.max_adapter_bytes} bytes per adapter")
                if time.monotonic() > deadline:
                    raise download_timeout_error(adapter_id, timeout)
                out.write(chunk)
    finally:
        body.close()
    return downloaded


def _safe_relative(path: str) -> bool:
    """A relative path of plain segments: nothing that could leave the folder it is joined to."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path or re.match(r"[A-Za-z]:", path):
        return False
    return all(segment not in ("", ".", "..") for segment in path.split("/"))


def _list_s3_adapter(adapter_id: str, client: object, bucket: str, prefix: str) -> dict[str, int]:
    """{file name: size} of the adapter files directly under `prefix`. Any direct child (object or sub-prefix) whose
    name could leave the target folder (`..`, an absolute path, backslashes) refuses the whole adapter."""
    sizes: dict[str, int] = {}
    seen = 0
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/", Delimiter="/")
    for page in pages:
        children = [(item["Key"], item.get("Size", 0)) for item in page.get("Contents", [])]
        children += [(item["Prefix"], None) for item in page.get("CommonPrefixes", [])]
        for key, size in children:
            seen += 1
            if seen > _MAX_S3_ENTRIES:
                raise AdapterLoadError(f"adapter {adapter_id!r}: more than {_MAX_S3_ENTRIES} objects under its "
                                       "prefix")
            name = key[len(prefix) + 1 :]
            if size is None:
                name = name[:-1] if name.endswith("/") else name
            if name == "" and size is not None:
                continue  # the `prefix/` folder marker some tools create
            if not _safe_relative(name):
                raise AdapterLoadError(f"adapter {adapter_id!r}: the S3 object {key!r} would be stored outside the "
                                       "adapter's folder; refusing the adapter")
            if size is not None and name in _ADAPTER_FILES:
                sizes[name] = int(size)
    return sizes


def _move_into_place(partial: Path, target: Path) -> None:
    """Replace `target` with the folder `partial` by renames. Sub-folders of an old `target` are other adapters
    (nested S3 prefixes): they move into the new folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            os.rename(partial, target)
            return
        except OSError:
            if not target.is_dir():  # not a concurrent download of the same adapter landing first
                raise
    old = target.with_name(f"{target.name}{_OLD}{uuid.uuid4().hex}")
    os.rename(target, old)
    try:
        os.rename(partial, target)
    except OSError:
        os.rename(old, target)
        raise
    for child in old.iterdir():
        if child.is_dir() and not child.is_symlink():
            os.rename(child, target / child.name)
    shutil.rmtree(old, ignore_errors=True)


def cached_on_disk(cache_dir: Path) -> list[tuple[str, str, int]]:
    """(source, adapter_id, bytes) of every adapter downloaded into `cache_dir`: Hub repos (huggingface_hub's own
    cache scan) and S3 prefixes mirrored under `cache_dir/s3` (downloads in progress are not listed). Local folders
    are not listed: they are the user's."""
    found = []
    if cache_dir.is_dir():
        for repo in scan_cache_dir(cache_dir).repos:
            if repo.repo_type == "model":
                found.append(("hub", repo.repo_id, repo.size_on_disk))
    s3_root = cache_dir / "s3"
    for config in sorted(s3_root.glob("**/adapter_config.json")) if s3_root.is_dir() else []:
        folder = config.parent
        relative = folder.relative_to(s3_root)
        if relative.parts[0] == _PARTIAL or any(_OLD in part for part in relative.parts):
            continue
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        found.append(("s3", "s3://" + relative.as_posix(), size))
    return found
