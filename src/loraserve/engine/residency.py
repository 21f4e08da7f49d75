"""Adapter residency, in one place: which adapters are on disk, in host memory and on the device, and who uses them.

Tiers: files on disk (the Hub cache, the S3 mirror, local folders), `HostAdapterCache` in host memory (an LRU
bounded in bytes), and the device tier here: the adapters whose weights sit in the model's LoRA layers, bounded by a
byte budget (and optionally a count), least recently used first out. Each device adapter has a slot id that tokens
name in a step's `LoRABatch`; it holds exactly its own ranks in the layers it targets (`layers.lora`), so memory
follows what is resident, not slots x a maximum rank.

The life of a request's adapter:
- `fetch` then `checked` (or `prepare`, blocking): resolve the name, read or download the files into host memory on
  a loader thread, wait for it at most the download timeout, check they fit;
- `pin` (the step loop, when the request is added): the host entry cannot be evicted while the request lives;
- `try_acquire` (the scheduler, at admission): copy into the device tier if needed, evicting idle adapters; False
  while the budget is held by adapters in use;
- `release` (the core, on preemption): the request gives its device use back and will acquire again;
- `finish` (the core, on finish or abort): device use and host pin both released.
Device writes happen on the step loop between steps, so a forward never reads a slot being written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraserve.adapters.cache import HostAdapter, HostAdapterCache
from loraserve.adapters.registry import AdapterKey, AdapterNames
from loraserve.adapters.sources import (
    DEFAULT_DOWNLOAD_TIMEOUT,
    AdapterSourcePolicy,
    cached_on_disk,
    download_timeout_error,
)
from loraserve.engine.request import AdapterPin, AdapterRef, Request
from loraserve.errors import AdapterInUse, AdapterLoadError, InvalidRequest
from loraserve.layers.embedding import VocabEmbedding
from loraserve.layers.linear import Linear
from loraserve.layers.lora import EmbeddingLoRA, OutputLoRA, ProjectionLoRA
from loraserve.layers.lora_kernel import fused_lora_available, fused_lora_info

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidencyLimits:
    device_bytes: int  # adapter weights held in the model's LoRA layers at once
    max_adapters: int  # adapters resident on the device at once; 0 disables LoRA
    max_rank: int | None  # refuse adapters of a larger rank; None = any rank
    host_bytes: int  # the host-memory LRU's budget
    cache_dir: Path
    s3_endpoint_url: str | None = None
    sources: AdapterSourcePolicy = AdapterSourcePolicy()  # where adapters may come from, and what they may hold
    download_timeout: float = DEFAULT_DOWNLOAD_TIMEOUT  # seconds a request waits for its adapter to be fetched


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    source: str
    tier: str  # "device" (in the model's LoRA layers), "host" (in memory) or "disk" (downloaded, not loaded)
    version: str | None = None  # digest of its files, once loaded
    rank: int | None = None  # the largest rank of its modules, once loaded
    size_bytes: int | None = None  # in memory once loaded, else on disk
    slot: int | None = None
    requests: int = 0  # requests in flight using it on the device
    names: tuple[str, ...] = ()  # names registered for it


@dataclass(eq=False)
class _DeviceAdapter:
    slot: int
    key: AdapterKey
    version: str
    nbytes: int
    rank: int
    layers: tuple[str, ...]  # the layers holding a part of it
    users: int = 0


def _features(layer: Linear | VocabEmbedding) -> tuple[int, int]:
    """(in, out) of the product an adapter's A and B apply: an embedding's input is the one-hot token."""
    if isinstance(layer, VocabEmbedding):
        return layer.num_embeddings, layer.embedding_dim
    return layer.in_features, layer.out_features


class AdapterResidency:
    def __init__(self, model: nn.Module, limits: ResidencyLimits, dtype: torch.dtype, device: torch.device) -> None:
        self.limits = limits
        self.names = AdapterNames()
        self._layers: dict[str, ProjectionLoRA | OutputLoRA | EmbeddingLoRA] = {}
        projections = {}
        for name, module in model.named_modules():
            if isinstance(module, (Linear, VocabEmbedding)):
                projections[name] = _features(module)
                if self.enabled:
                    if isinstance(module, VocabEmbedding):
                        module.lora = EmbeddingLoRA()
                    elif name == "lm_head":
                        module.lora = OutputLoRA()
                    else:
                        module.lora = ProjectionLoRA(module.in_features, module.out_features, dtype, device)
                    self._layers[name] = module.lora
        if self.enabled and fused_lora_available(device):  # compiled (or loaded from its cache) now, not mid-step
            logger.info("fused LoRA op: %s", fused_lora_info())
        self.host = HostAdapterCache(projections, dtype, limits.cache_dir, limits.s3_endpoint_url, limits.host_bytes,
                                     limits.sources, download_timeout=limits.download_timeout)
        self._device: OrderedDict[tuple[AdapterKey, str], _DeviceAdapter] = OrderedDict()  # LRU first
        self._by_slot: dict[int, _DeviceAdapter] = {}
        self._free_slots: list[int] = []
        self._device_bytes = 0
        self.device_loads = 0
        self.device_evictions = 0

    @property
    def enabled(self) -> bool:
        return self.limits.max_adapters > 0

    def require_enabled(self) -> None:
        if not self.enabled:
            raise InvalidRequest("this server runs without LoRA adapters (--max-active-adapters 0)")

    # -- the request path -----------------------------------------------------------------------------------------

    def key_of(self, ref: AdapterRef) -> AdapterKey:
        """A registered name first, else the id at the request's source."""
        return self.names.lookup(ref.adapter_id) or AdapterKey(ref.source, ref.adapter_id)

    def prepare(self, ref: AdapterRef) -> HostAdapter:
        """Host-resident and checked to fit (blocking, at most the download timeout: call it off the step loop);
        raises the adapter's own error."""
        try:
            entry = self.fetch(ref).result(timeout=self.limits.download_timeout)
        except TimeoutError:
            raise self.download_timed_out(ref) from None
        return self.checked(ref, entry)

    def fetch(self, ref: AdapterRef) -> Future[HostAdapter]:
        """Start making the adapter host-resident; never waits on the network (see `HostAdapterCache.fetch`)."""
        self.require_enabled()
        if ref.merge is not None:
            return self.host.fetch_merged(ref.merge, ref.source, ref.token)
        return self.host.fetch(self.key_of(ref), ref.token)

    def download_timed_out(self, ref: AdapterRef) -> AdapterLoadError:
        return download_timeout_error(ref.adapter_id, self.limits.download_timeout)

    def checked(self, ref: AdapterRef, entry: HostAdapter) -> HostAdapter:
        """`entry`, once it is known to fit this server's rank cap and device memory."""
        rank = entry.adapter.max_rank
        if self.limits.max_rank is not None and rank > self.limits.max_rank:
            raise AdapterLoadError(f"adapter {ref.adapter_id!r} has rank {rank}; this server serves at most "
                                   f"{self.limits.max_rank} (--max-lora-rank)")
        if entry.nbytes > self.limits.device_bytes:
            raise AdapterLoadError(f"adapter {ref.adapter_id!r} holds {entry.nbytes / 2**20:.1f} MiB, more than the "
                                   f"adapter device memory ({self.limits.device_bytes / 2**20:.1f} MiB, "
                                   "--adapter-device-memory)")
        return entry

    def pin(self, request: Request, entry: HostAdapter) -> None:
        self.host.pin(entry)
        request.adapter_pin = AdapterPin(entry)

    def try_acquire(self, request: Request) -> bool:
        """The scheduler's gate: True once the request's adapter is on the device for it (or it needs none)."""
        pin = request.adapter_pin
        if pin is None or pin.slot >= 0:
            return True
        resident = self._on_device(pin.entry)
        if resident is None:
            return False
        resident.users += 1
        pin.slot = resident.slot
        return True

    def release(self, request: Request) -> None:
        """Give back the request's device use (it stays resident, idle, until evicted)."""
        pin = request.adapter_pin
        if pin is not None and pin.slot >= 0:
            self._by_slot[pin.slot].users -= 1
            pin.slot = -1

    def finish(self, request: Request) -> None:
        """The request ended: device use and host pin released. Safe to call twice."""
        pin = request.adapter_pin
        if pin is None:
            return
        self.release(request)
        request.adapter_pin = None
        self.host.unpin(pin.entry)

    # -- management -----------------------------------------------------------------------------------------------

    def activate(self, entry: HostAdapter) -> bool:
        """Copy a host-resident adapter onto the device ahead of its requests; False while the budget is in use."""
        return self._on_device(entry) is not None

    def unload(self, key: AdapterKey) -> bool:
        """Drop the adapter from the device and from host memory (its files stay on disk); False if neither held it.
        Refused while requests use it: they read its weights every step."""
        resident = [d for d in self._device.values() if d.key == key]
        in_use = sum(d.users for d in resident)
        if in_use:
            raise AdapterInUse(f"adapter {key.adapter_id!r} serves {in_use} request(s) now; unload it when they "
                               "finish")
        for device_adapter in resident:
            self._evict(device_adapter)
        return self.host.remove(key) or bool(resident)

    def resident(self) -> list[AdapterInfo]:
        """The device and host tiers, one entry per version held, most recently used last (cheap: call it between
        steps). An old version stays on the device, unused, until it is evicted."""
        known: dict[tuple[AdapterKey, str], AdapterInfo] = {}
        for entry in self.host.entries():
            known[(entry.key, entry.version)] = AdapterInfo(entry.key.adapter_id, entry.key.source, "host",
                                                            entry.version, entry.adapter.max_rank, entry.nbytes)
        for d in self._device.values():
            known[(d.key, d.version)] = AdapterInfo(d.key.adapter_id, d.key.source, "device", d.version, d.rank,
                                                    d.nbytes, d.slot, d.users)
        return [dataclasses.replace(info, names=tuple(self.names.names_of(key))) for (key, _), info in known.items()]

    def on_disk(self) -> list[AdapterInfo]:
        """Adapters downloaded into the cache folder (blocking disk scan: call it off the step loop)."""
        return [AdapterInfo(adapter_id, source, "disk", size_bytes=size)
                for source, adapter_id, size in cached_on_disk(self.host.cache_dir)]

    @property
    def device_bytes(self) -> int:
        return self._device_bytes

    @property
    def device_count(self) -> int:
        return len(self._device)

    @property
    def layer_bytes(self) -> int:
        """What the LoRA layers hold, free arena rows included."""
        return sum(layer.nbytes for layer in self._layers.values())

    # -- the device tier ------------------------------------------------------------------------------------------

    def _on_device(self, entry: HostAdapter) -> _DeviceAdapter | None:
        """The device copy of `entry` (written now if needed, evicting idle adapters), or None when it cannot fit."""
        ident = (entry.key, entry.version)
        resident = self._device.get(ident)
        if resident is None:
            if not self._make_room(entry.nbytes):
                return None
            resident = self._write(entry)
        self._device.move_to_end(ident)
        return resident

    def _make_room(self, nbytes: int) -> bool:
        """Evict idle adapters, least recently used first, until `nbytes` more fit the budget and the count cap."""
        def fits() -> bool:
            return (self._device_bytes + nbytes <= self.limits.device_bytes
                    and len(self._device) < self.limits.max_adapters)

        for device_adapter in list(self._device.values()):
            if fits():
                return True
            if device_adapter.users == 0:
                self._evict(device_adapter)
        return fits()

    def _write(self, entry: HostAdapter) -> _DeviceAdapter:
        slot = self._free_slots.pop() if self._free_slots else len(self._by_slot)
        for name, module in entry.adapter.modules.items():
            self._layers[name].place(slot, module.a, module.b)
        resident = _DeviceAdapter(slot, entry.key, entry.version, entry.nbytes, entry.adapter.max_rank,
                                  tuple(entry.adapter.modules))
        self._device[(entry.key, entry.version)] = resident
        self._by_slot[slot] = resident
        self._device_bytes += entry.nbytes
        self.device_loads += 1
        return resident

    def _evict(self, resident: _DeviceAdapter) -> None:
        for name in resident.layers:
            self._layers[name].remove(resident.slot)
        del self._device[(resident.key, resident.version)]
        del self._by_slot[resident.slot]
        self._free_slots.append(resident.slot)
        self._device_bytes -= resident.nbytes
        self.device_evictions += 1
