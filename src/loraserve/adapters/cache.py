"""The host-memory tier of adapters: read once from disk (or downloaded once to it), kept in an LRU bounded in bytes.

Thread-safe and single-flight: `fetch` answers with a future and never waits on the network. A load (and a Hub
access check) runs on a thread of its own that every request for that adapter shares, so a stalled download holds
that one thread and the requests waiting for that adapter, never the worker threads everyone else's tokenizing and
adapters need. Whatever a load raises, the waiters get the same error and the next request may try again: an
unexpected exception is reported as an `AdapterLoadError` (its kind only), never left as a future nobody resolves.
A failure is remembered for `failure_ttl` seconds per (adapter, token), so a broken adapter fails its requests at
once instead of being fetched again for each; a request with another token still gets its own try.

Every entry carries a version, a digest of its files (of its parts' versions for a merge): a reload of changed
files is a new version, so a device slot filled from the old files is never served for the new ones. Local folders
are checked for changes (size and modification time of each file) on every lookup; Hub and S3 adapters are re-read
when they leave memory. Entries pinned by requests in flight are never evicted.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch

from loraserve.adapters.merge import MergeSpec, merge_adapters
from loraserve.adapters.peft import LoRAAdapter, load_peft_adapter
from loraserve.adapters.registry import AdapterKey
from loraserve.adapters.sources import (
    DEFAULT_DOWNLOAD_TIMEOUT,
    AdapterSourcePolicy,
    check_hub_access,
    resolve_adapter,
)
from loraserve.errors import AdapterLoadError, LoraserveError

logger = logging.getLogger(__name__)
_DIGEST_CHUNK = 1 << 20
K = TypeVar("K")
V = TypeVar("V")


# Failures and Hub grants are remembered per (adapter, token): both come from requests, so a client naming made-up
# adapters or tokens could otherwise grow them without end. Past this many, the oldest are forgotten (which costs
# only a retry, or a Hub metadata call).
MAX_REMEMBERED = 10_000

LOAD_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class LoadTimes:
    """How long loads into host memory took (read or download, validate): cumulative counts per upper bound."""

    bucket_counts: tuple[int, ...]  # loads that took at most LOAD_SECONDS_BUCKETS[i] seconds, cumulative
    count: int
    total_seconds: float


class _Recent(Generic[K, V]):
    """A map whose entries expire `ttl` seconds after they were put and that holds at most `limit` of them, oldest
    out first. Not thread-safe: the cache uses it under its lock."""

    def __init__(self, ttl: float, clock: Callable[[], float], limit: int = MAX_REMEMBERED) -> None:
        self.ttl = ttl
        self.clock = clock
        self.limit = limit
        self._items: OrderedDict[K, tuple[V, float]] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        return item[0] if item is not None and self.clock() - item[1] < self.ttl else None

    def put(self, key: K, value: V) -> None:
        now = self.clock()
        self._items.pop(key, None)
        self._items[key] = (value, now)
        while self._items and (len(self._items) > self.limit or now - self._oldest_time() >= self.ttl):
            self._items.popitem(last=False)

    def _oldest_time(self) -> float:
        return next(iter(self._items.values()))[1]


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


def _running_future() -> Future:
    """A future its maker will resolve; marked running, so that a waiter that gives up (cancels its wait) cannot
    cancel it for the others."""
    future: Future = Future()
    future.set_running_or_notify_cancel()
    return future


def _resolved(entry: HostAdapter) -> Future[HostAdapter]:
    future: Future[HostAdapter] = Future()
    future.set_result(entry)
    return future


def _failed(error: BaseException) -> Future[HostAdapter]:
    future: Future[HostAdapter] = Future()
    future.set_exception(error)
    return future


def _reported(error: BaseException, adapter_id: str) -> LoraserveError:
    """What the requests hear of a failure: the adapter's own error, or an unexpected one as a load failure with its
    kind only (its text may name server folders or internal URLs: that goes to the log)."""
    if isinstance(error, LoraserveError):
        return error
    logger.warning("loading adapter %r failed unexpectedly", adapter_id, exc_info=error)
    reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
    return AdapterLoadError(f"adapter {adapter_id!r}: cannot load it ({reason})")


def _in_thread(future: Future[HostAdapter], adapter_id: str, work: Callable[[], HostAdapter]) -> Future[HostAdapter]:
    """`work()` on a daemon thread of its own, its outcome in `future` (returned)."""

    def run() -> None:
        try:
            future.set_result(work())
        except BaseException as error:  # noqa: BLE001 - the waiters must hear how it ended
            future.set_exception(_reported(error, adapter_id))

    threading.Thread(target=run, name="loraserve-adapter-load", daemon=True).start()
    return future


class HostAdapterCache:
    def __init__(self, projections: dict[str, tuple[int, int]], dtype: torch.dtype, cache_dir: Path,
                 s3_endpoint_url: str | None, max_bytes: int, policy: AdapterSourcePolicy = AdapterSourcePolicy(),
                 failure_ttl: float = 30.0, grant_ttl: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT) -> None:
        self.projections = projections
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.s3_endpoint_url = s3_endpoint_url
        self.max_bytes = max_bytes
        self.policy = policy
        self.clock = clock
        self.download_timeout = download_timeout
        self.loads = 0
        self.hits = 0
        self.evictions = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[AdapterKey, HostAdapter] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._pins = 0
        self._loading: dict[AdapterKey, Future] = {}
        # per (adapter, token): the failure of its last load, and whether the token was shown to reach a Hub adapter
        self._failures: _Recent[tuple[AdapterKey, str | None], LoraserveError] = _Recent(failure_ttl, self._now)
        self._grants: _Recent[tuple[AdapterKey, str | None], bool] = _Recent(grant_ttl, self._now)
        self._load_buckets = [0] * len(LOAD_SECONDS_BUCKETS)
        self._load_count = 0
        self._load_seconds = 0.0

    def _now(self) -> float:
        return self.clock()  # read late: tests replace `clock` on a built cache

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def pinned(self) -> int:
        """Pins held now: one per request in flight with an adapter (what a leak would leave above zero)."""
        return self._pins

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
            self._pins += 1

    def unpin(self, entry: HostAdapter) -> None:
        with self._lock:
            entry.pins -= 1
            self._pins -= 1
            self._evict()

    def get(self, key: AdapterKey, token: str | None) -> HostAdapter:
        """`fetch`, waited for (blocking); raises the adapter's own error if it cannot load."""
        return self.fetch(key, token).result()

    def fetch(self, key: AdapterKey, token: str | None) -> Future[HostAdapter]:
        """The adapter as a future: done at once when it is in memory (or failed lately), else resolved by the load
        every request for it shares. Blocks on nothing but a local folder's stat calls.

        A Hub adapter in memory is served to a token only once that token has been shown to reach it (the load, or a
        metadata call to the Hub with it, remembered for `grant_ttl` seconds): a private adapter one user loaded is
        never handed to another user's request that could not download it.
        """
        loaded = self._fetch(key, token, lambda: self._load(key, token))
        if key.source != "hub":
            return loaded
        granted = _running_future()
        loaded.add_done_callback(lambda done: self._grant(done, key, token, granted))
        return granted

    def _grant(self, loaded: Future[HostAdapter], key: AdapterKey, token: str | None,
               granted: Future[HostAdapter]) -> None:
        """Hand the loaded Hub adapter on once `token` is known to reach it; else ask the Hub first, on a thread of
        its own (a metadata call can stall like a download)."""
        error = loaded.exception()
        with self._lock:
            reached = self._grants.get((key, token)) is not None
        if error is not None:
            granted.set_exception(error)
        elif reached:
            granted.set_result(loaded.result())
        else:
            def checked() -> HostAdapter:
                self._check_access(key, token)
                return loaded.result()

            _in_thread(granted, key.adapter_id, checked)

    def _load(self, key: AdapterKey, token: str | None) -> HostAdapter:
        path = resolve_adapter(key.adapter_id, key.source, token, self.cache_dir, self.s3_endpoint_url,
                               policy=self.policy, timeout=self.download_timeout)
        with self._lock:
            self._grants.put((key, token), True)
        signature = _file_signature(path)
        adapter = load_peft_adapter(path, key.adapter_id, self.projections, self.dtype,
                                    allow_pickle=self.policy.allow_pickle, max_bytes=self.policy.max_adapter_bytes)
        return HostAdapter(key, adapter, _digest(path), path, signature)

    def _check_access(self, key: AdapterKey, token: str | None) -> None:
        """Ask the Hub with `token` (metadata only); raises AdapterNotFound if the token cannot see the repository,
        and remembers that refusal like a failed load."""
        with self._lock:
            failure = self._failures.get((key, token))
        if failure is not None:
            raise failure
        try:
            check_hub_access(key.adapter_id, token, policy=self.policy, timeout=self.download_timeout)
        except LoraserveError as error:
            with self._lock:
                self._failures.put((key, token), error)
            raise
        with self._lock:
            self._grants.put((key, token), True)

    def fetch_merged(self, spec: MergeSpec, source: str, token: str | None) -> Future[HostAdapter]:
        """`get_merged` as a future, worked out on a thread of its own (its parts may need downloading)."""
        return _in_thread(_running_future(), spec.key, lambda: self.get_merged(spec, source, token))

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

        entry = self._fetch(key, token, merge).result()
        if entry.version != digest:  # a part changed since this merge was computed
            self.remove(key)
            entry = self._fetch(key, token, merge).result()
        return entry

    def _fresh(self, entry: HostAdapter) -> bool:
        """False once a local folder's files changed since they were read."""
        if entry.key.source != "local" or entry.path is None:
            return True
        try:
            return _file_signature(entry.path) == entry.signature
        except OSError:
            return False

    def _fetch(self, key: AdapterKey, token: str | None, load: Callable[[], HostAdapter]) -> Future[HostAdapter]:
        """The entry from memory, the failure remembered for (key, token), the load in flight, or a new load started
        on a thread of its own."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._fresh(entry):
                self._entries.move_to_end(key)
                self.hits += 1
                return _resolved(entry)
            failure = self._failures.get((key, token))
            if failure is not None:
                return _failed(failure)
            future = self._loading.get(key)
            if future is not None:
                return future
            future = self._loading[key] = _running_future()
        threading.Thread(target=self._complete, args=(key, token, load, future), name="loraserve-adapter-load",
                         daemon=True).start()
        return future

    def _complete(self, key: AdapterKey, token: str | None, load: Callable[[], HostAdapter],
                  future: Future[HostAdapter]) -> None:
        started = time.perf_counter()
        try:
            entry = load()
        except BaseException as error:  # noqa: BLE001 - every waiter must hear how the load ended
            reported = _reported(error, key.adapter_id)
            with self._lock:
                self._failures.put((key, token), reported)
                del self._loading[key]
            future.set_exception(reported)
            return
        elapsed = time.perf_counter() - started
        with self._lock:
            self._store(entry)
            del self._loading[key]
            self._load_count += 1
            self._load_seconds += elapsed
            for i, bound in enumerate(LOAD_SECONDS_BUCKETS):
                self._load_buckets[i] += elapsed <= bound
        future.set_result(entry)

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
