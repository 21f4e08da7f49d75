"""The host-memory tier of adapters: read once from disk (or downloaded once to it), kept in an LRU bounded in bytes.

Thread-safe and single-flight: the residency calls `get` from worker threads so that reading and downloading never
run on the step loop, and concurrent requests for one cold adapter share one load. Whatever a load raises, the
waiters get the same error and the next request may try again: an unexpected exception is reported as an
`AdapterLoadError`, never left as a future nobody resolves. A failure is remembered for `failure_ttl` seconds per
(adapter, token), so a broken adapter fails its requests at once instead of being fetched again for each; a request
with another token still gets its own try.

Every entry carries a version, a digest of its files (of its parts' versions for a merge): a reload of changed
files is a new version, so a device slot filled from the old files is never served for the new ones. Local folders
are checked for changes (size and modification time of each file) on every lookup; Hub and S3 adapters are re-read
when they leave memory. Entries pinned by requests in flight are never evicted.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraserve.adapters.merge import MergeSpec, merge_adapters
from loraserve.adapters.peft import LoRAAdapter, load_peft_adapter
from loraserve.adapters.registry import AdapterKey
from loraserve.adapters.sources import AdapterSourcePolicy, check_hub_access, resolve_adapter
from loraserve.errors import AdapterLoadError, LoraserveError

logger = logging.getLogger(__name__)
_DIGEST_CHUNK = 1 << 20


LOAD_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class LoadTimes:
    """How long loads into host memory took (read or download, validate): cumulative counts per upper bound."""

    bucket_counts: tuple[int, ...]  # loads that took at most LOAD_SECONDS_BUCKETS[i] seconds, cumulative
    count: int
    total_seconds: float


@dataclass(eq=False)
class HostAdapter:
    """One adapter in host memory, at one version; `pins` counts the requests in flight that use it."""

    key: AdapterKey
    adapter: LoRAAdapter
    version: str
    path: Path | None = None  # the folder it was read from (None for a merge)
    signature: tuple = ()  # (name, size, mtime) of each file at load: a local folder is re-read when this changes
    pins: int = field(default=0)

    @property
    def nbytes(self) -> int:
        return self.adapter.nbytes


def _file_signature(path: Path) -> tuple:
    stats = [(f.name, f.stat()) for f in path.iterdir() if f.is_file()]
    return tuple(sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats))


def _digest(path: Path) -> str:
    """A digest of the folder's files by name and content: the adapter's version."""
    digest = hashlib.blake2b(digest_size=12)
    for file in sorted(f for f in path.iterdir() if f.is_file()):
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(_DIGEST_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


class HostAdapterCache:
    def __init__(self, projections: dict[str, tuple[int, int]], dtype: torch.dtype, cache_dir: Path,
                 s3_endpoint_url: str | None, max_bytes: int, policy: AdapterSourcePolicy = AdapterSourcePolicy(),
                 failure_ttl: float = 30.0, grant_ttl: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.projections = projections
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.s3_endpoint_url = s3_endpoint_url
        self.max_bytes = max_bytes
        self.policy = policy
        self.failure_ttl = failure_ttl
        self.grant_ttl = grant_ttl
        self.clock = clock
        self.loads = 0
        self.hits = 0
        self.evictions = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[AdapterKey, HostAdapter] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._loading: dict[AdapterKey, Future] = {}
        self._failures: dict[tuple[AdapterKey, str | None], tuple[LoraserveError, float]] = {}
        self._grants: dict[tuple[AdapterKey, str | None], float] = {}  # (hub adapter, token) -> when it reached it
        self._load_buckets = [0] * len(LOAD_SECONDS_BUCKETS)
        self._load_count = 0
        self._load_seconds = 0.0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def entries(self) -> list[HostAdapter]:
        """Every adapter in memory, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def load_times(self) -> LoadTimes:
        with self._lock:
            return LoadTimes(tuple(self._load_buckets), self._load_count, self._load_seconds)

    def remove(self, key: AdapterKey) -> bool:
        """Drop an adapter from memory (its files stay on disk; requests holding it keep their copy); False if it
        was not here."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry.nbytes
            return entry is not None

    def pin(self, entry: HostAdapter) -> None:
        with self._lock:
            entry.pins += 1

    def unpin(self, entry: HostAdapter) -> None:
        with self._lock:
            entry.pins -= 1
            self._evict()

    def get(self, key: AdapterKey, token: str | None) -> HostAdapter:
        """The adapter, from memory or loaded now (blocking); raises the adapter's own error if it cannot load.

        A Hub adapter in memory is served to a token only once that token has been shown to reach it (the load, or a
        metadata call to the Hub with it, remembered for `grant_ttl` seconds): a private adapter one user loaded is
        never handed to another user's request that could not download it.
        """

        def load() -> HostAdapter:
            path = resolve_adapter(key.adapter_id, key.source, token, self.cache_dir, self.s3_endpoint_url,
                                   policy=self.policy)
            with self._lock:
                self._grants[(key, token)] = self.clock()
            signature = _file_signature(path)
            adapter = load_peft_adapter(path, key.adapter_id, self.projections, self.dtype,
                                        allow_pickle=self.policy.allow_pickle,
                                        max_bytes=self.policy.max_adapter_bytes)
            return HostAdapter(key, adapter, _digest(path), path, signature)

        entry = self._get(key, token, load)
        if key.source == "hub" and self.clock() - self._grants.get((key, token), -math.inf) > self.grant_ttl:
            self._check_access(key, token)
        return entry

    def _check_access(self, key: AdapterKey, token: str | None) -> None:
        """Ask the Hub with `token` (metadata only); raises AdapterNotFound if the token cannot see the repository,
        and remembers that refusal like a failed load."""
        with self._lock:
            failure = self._failures.get((key, token))
        if failure is not None and self.clock() - failure[1] < self.failure_ttl:
            raise failure[0]
        try:
            check_hub_access(key.adapter_id, token, policy=self.policy)
        except LoraserveError as error:
            with self._lock:
                self._failures[(key, token)] = (error, self.clock())
            raise
        with self._lock:
            self._grants[(key, token)] = self.clock()

    def get_merged(self, spec: MergeSpec, source: str, token: str | None) -> HostAdapter:
        """The merge of `spec`'s adapters (each fetched from `source` with `token`), computed once and kept like any
        other adapter; the parts stay cached on their own and are fetched first, so each part's access is checked
        for this request's token even when the merge is already in memory. Its version follows its parts'."""
        parts = [self.get(AdapterKey(source, adapter_id), token) for adapter_id in spec.adapter_ids]
        digest = hashlib.blake2b(",".join(p.version for p in parts).encode(), digest_size=12).hexdigest()
        key = AdapterKey(source, spec.key)

        def merge() -> HostAdapter:
            merged = merge_adapters([p.adapter for p in parts], spec, torch.Generator().manual_seed(0))
            return HostAdapter(key, merged, digest)

        entry = self._get(key, token, merge)
        if entry.version != digest:  # a part changed since this merge was computed
            self.remove(key)
            entry = self._get(key, token, merge)
        return entry

    def _fresh(self, entry: HostAdapter) -> bool:
        """False once a local folder's files changed since they were read."""
        if entry.key.source != "local" or entry.path is None:
            return True
        try:
            return _file_signature(entry.path) == entry.signature
        except OSError:
            return False

    def _get(self, key: AdapterKey, token: str | None, load: Callable[[], HostAdapter]) -> HostAdapter:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._fresh(entry):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            failure = self._failures.get((key, token))
            if failure is not None:
                if self.clock() - failure[1] < self.failure_ttl:
                    raise failure[0]
                del self._failures[(key, token)]
            future = self._loading.get(key)
            owner = future is None
            if owner:
                future = self._loading[key] = Future()
        if not owner:
            return future.result()
        started = time.perf_counter()
        try:
            entry = load()
        except BaseException as error:  # noqa: BLE001 - every waiter must hear how the load ended
            reported = error if isinstance(error, LoraserveError) else AdapterLoadError(
                f"adapter {key.adapter_id!r}: cannot load it: {type(error).__name__}: {error}")
            if reported is not error:
                logger.warning("loading adapter %s failed unexpectedly", key, exc_info=error)
            with self._lock:
                self._failures[(key, token)] = (reported, self.clock())
                del self._loading[key]
            future.set_exception(reported)
            if reported is error:
                raise
            raise reported from error
        elapsed = time.perf_counter() - started
        with self._lock:
            self._store(entry)
            del self._loading[key]
            self._load_count += 1
            self._load_seconds += elapsed
            for i, bound in enumerate(LOAD_SECONDS_BUCKETS):
                self._load_buckets[i] += elapsed <= bound
        future.set_result(entry)
        return entry

    def _store(self, entry: HostAdapter) -> None:
        previous = self._entries.pop(entry.key, None)
        if previous is not None:
            self._bytes -= previous.nbytes
        self._entries[entry.key] = entry
        self._bytes += entry.nbytes
        self.loads += 1
        self._evict()

    def _evict(self) -> None:
        """Least recently used unpinned entries leave while over budget; the newest entry always stays."""
        for key in list(self._entries)[:-1]:
            if self._bytes <= self.max_bytes:
                return
            entry = self._entries[key]
            if entry.pins == 0:
                del self._entries[key]
                self._bytes -= entry.nbytes
                self.evictions += 1
