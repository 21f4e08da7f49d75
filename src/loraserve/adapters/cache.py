"""The host-memory tier of adapters: read once from disk (or downloaded once to it), kept in an LRU bounded in bytes.

Thread-safe and single-flight: the async front calls `get` from worker threads so that reading and downloading never
run on the step loop, and concurrent requests for one cold adapter share one load. A failure is remembered for
`failure_ttl` seconds per (adapter, token), so a broken adapter fails its requests at once instead of being fetched
again for each; a request with another token still gets its own try.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch

from loraserve.adapters.merge import MergeSpec, merge_adapters
from loraserve.adapters.peft import LoRAAdapter, load_peft_adapter
from loraserve.adapters.sources import check_hub_access, resolve_adapter
from loraserve.errors import LoraserveError


class HostAdapterCache:
    def __init__(self, projections: dict[str, tuple[int, int]], dtype: torch.dtype, cache_dir: Path,
                 s3_endpoint_url: str | None, max_bytes: int, failure_ttl: float = 30.0,
                 grant_ttl: float = 600.0) -> None:
        self.projections = projections
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.s3_endpoint_url = s3_endpoint_url
        self.max_bytes = max_bytes
        self.failure_ttl = failure_ttl
        self.grant_ttl = grant_ttl
        self.loads = 0
        self.hits = 0
        self.evictions = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._loading: dict[str, Future] = {}
        self._failures: dict[tuple[str, str | None], tuple[LoraserveError, float]] = {}
        self._grants: dict[tuple[str, str | None], float] = {}  # (hub adapter, token) -> when the token reached it

    @property
    def nbytes(self) -> int:
        return self._bytes

    def entries(self) -> list[tuple[str, LoRAAdapter]]:
        """(`source:adapter_id`, adapter) of every adapter in memory, least recently used first."""
        with self._lock:
            return list(self._entries.items())

    def remove(self, key: str) -> bool:
        """Drop an adapter from memory (its files stay on disk); False if it was not here."""
        with self._lock:
            adapter = self._entries.pop(key, None)
            if adapter is not None:
                self._bytes -= adapter.nbytes
            return adapter is not None

    def get(self, adapter_id: str, source: str, token: str | None) -> LoRAAdapter:
        """The adapter, from memory or loaded now (blocking); raises the adapter's own error if it cannot load.

        A Hub adapter in memory is served to a token only once that token has been shown to reach it (the load, or a
        metadata call to the Hub with it, remembered for `grant_ttl` seconds): a private adapter one user loaded is
        never handed to another user's request that could not download it.
        """
        key = f"{source}:{adapter_id}"

        def load() -> LoRAAdapter:
            path = resolve_adapter(adapter_id, source, token, self.cache_dir, self.s3_endpoint_url)
            self._grants[(key, token)] = time.monotonic()
            return load_peft_adapter(path, adapter_id, self.projections, self.dtype)

        adapter = self._get(key, token, load)
        if source == "hub" and time.monotonic() - self._grants.get((key, token), -math.inf) > self.grant_ttl:
            self._check_access(adapter_id, key, token)
        return adapter

    def _check_access(self, adapter_id: str, key: str, token: str | None) -> None:
        """Ask the Hub with `token` (metadata only); raises AdapterNotFound if the token cannot see the repository,
        and remembers that refusal like a failed load."""
        with self._lock:
            failure = self._failures.get((key, token))
        if failure is not None and time.monotonic() - failure[1] < self.failure_ttl:
            raise failure[0]
        try:
            check_hub_access(adapter_id, token)
        except LoraserveError as error:
            with self._lock:
                self._failures[(key, token)] = (error, time.monotonic())
            raise
        self._grants[(key, token)] = time.monotonic()

    def get_merged(self, spec: MergeSpec, source: str, token: str | None) -> LoRAAdapter:
        """The merge of `spec`'s adapters (each fetched from `source` with `token`), computed once and kept like any
        other adapter; the parts stay cached on their own and are fetched first, so each part's access is checked
        for this request's token even when the merge is already in memory."""
        parts = [self.get(adapter_id, source, token) for adapter_id in spec.adapter_ids]
        return self._get(f"{source}:{spec.key}", token,
                         lambda: merge_adapters(parts, spec, torch.Generator().manual_seed(0)))

    def _get(self, key: str, token: str | None, load: Callable[[], LoRAAdapter]) -> LoRAAdapter:
        with self._lock:
            adapter = self._entries.get(key)
            if adapter is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return adapter
            failure = self._failures.get((key, token))
            if failure is not None and time.monotonic() - failure[1] < self.failure_ttl:
                raise failure[0]
            future = self._loading.get(key)
            owner = future is None
            if owner:
                future = self._loading[key] = Future()
        if not owner:
            return future.result()
        try:
            adapter = load()
        except LoraserveError as error:
            with self._lock:
                self._failures[(key, token)] = (error, time.monotonic())
                del self._loading[key]
            future.set_exception(error)
            raise
        with self._lock:
            self._store(key, adapter)
            del self._loading[key]
        future.set_result(adapter)
        return adapter

    def _store(self, key: str, adapter: LoRAAdapter) -> None:
        self._entries[key] = adapter
        self._bytes += adapter.nbytes
        self.loads += 1
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.nbytes
            self.evictions += 1
