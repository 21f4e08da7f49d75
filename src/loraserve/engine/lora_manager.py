"""Which adapters sit in the model's LoRA slots: copied in from the host tier on first use, the least recently used
idle one evicted.

Three tiers: files on disk (the Hub cache, the S3 mirror, local folders), `HostAdapterCache` in memory, and these
device slots. The async front loads into the host tier from a worker thread before a request enters the engine, so
the step loop only copies tensors into a slot (between steps: a forward never reads a slot being written).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraserve.adapters.cache import HostAdapterCache
from loraserve.adapters.peft import LoRAAdapter
from loraserve.adapters.sources import cached_on_disk
from loraserve.engine.request import AdapterRef
from loraserve.errors import AdapterInUse, AdapterLoadError
from loraserve.layers.embedding import VocabEmbedding
from loraserve.layers.linear import Linear
from loraserve.layers.lora import EmbeddingLoRASlots, LoRASlots, OutputLoRASlots

logger = logging.getLogger(__name__)


def _features(layer: Linear | VocabEmbedding) -> tuple[int, int]:
    """(in, out) of the product an adapter's A and B apply: an embedding's input is the one-hot token."""
    if isinstance(layer, VocabEmbedding):
        return layer.num_embeddings, layer.embedding_dim
    return layer.in_features, layer.out_features


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    source: str
    tier: str  # "active" (in a LoRA slot), "host" (in memory) or "disk" (downloaded, not loaded)
    rank: int | None = None  # the largest rank of its modules, once loaded
    size_bytes: int | None = None  # in memory once loaded, else on disk
    slot: int | None = None
    requests: int = 0  # requests in flight on it


class LoRAManager:
    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, cache_dir: Path, s3_endpoint_url: str | None = None,
                 host_bytes: int = 1 << 30) -> None:
        # Every projection inside the decoder layers gets its slots now. The lm_head's and the embedding's cost
        # vocab x rank per slot (268 MB each for Gemma 3's 262k vocabulary at 32 slots of rank 16 in bf16), so they
        # are allocated when the first adapter targeting them is written into a slot.
        self.layers: dict[str, Linear | VocabEmbedding] = {}
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                self.layers[name] = module
                if name != "lm_head":
                    module.lora = LoRASlots(module.in_features, module.out_features, num_slots, max_rank, dtype,
                                            device)
            elif isinstance(module, VocabEmbedding):
                self.layers[name] = module
        self._slot_args = (num_slots, max_rank, dtype, device)
        projections = {name: _features(m) for name, m in self.layers.items()}
        self.host = HostAdapterCache(projections, dtype, cache_dir, s3_endpoint_url, host_bytes)
        self.max_rank = max_rank
        self.ranks = [0] * num_slots  # the largest rank held by each slot (0 = empty)
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter key -> slot, least recently used first
        self._users: Counter[int] = Counter()  # requests in flight per slot
        self.slot_loads = 0
        self.slot_evictions = 0

    def prepare(self, ref: AdapterRef) -> LoRAAdapter:
        """Make the adapter host-resident and check it fits a slot; its errors belong to the request adding it, so
        they raise here rather than later inside the scheduler's gate, where they would fail the whole step."""
        adapter = self._host_adapter(ref)
        if adapter.max_rank > self.max_rank:
            raise AdapterLoadError(f"adapter {ref.adapter_id!r} has rank {adapter.max_rank}; this server's slots "
                                   f"hold at most {self.max_rank} (--max-lora-rank)")
        return adapter

    def try_acquire(self, ref: AdapterRef, weights: LoRAAdapter | None = None) -> int | None:
        """The slot holding the adapter (copied in from `weights`, or from the host tier, if needed), or None while
        every slot is held by requests in flight; the caller must `release` a slot it got."""
        key = f"{ref.source}:{ref.adapter_id}"
        slot = self._resident.get(key)
        if slot is None:
            adapter = weights if weights is not None else self._host_adapter(ref)
            slot = self._free_slot()
            if slot is None:
                return None
            self._write(slot, adapter)
            self._resident[key] = slot
        self._resident.move_to_end(key)
        self._users[slot] += 1
        return slot

    def resident(self) -> list[str]:
        """Ids of the adapters in slots now, most recently used last."""
        return [key.split(":", 1)[1] for key in self._resident]

    def inventory(self) -> list[AdapterInfo]:
        """Every adapter this server knows, at its highest tier: in a slot, in host memory, or only on disk."""
        known: dict[str, AdapterInfo] = {}
        for source, adapter_id, size in cached_on_disk(self.host.cache_dir):
            known[f"{source}:{adapter_id}"] = AdapterInfo(adapter_id, source, "disk", size_bytes=size)
        for key, adapter in self.host.entries():
            source, adapter_id = key.split(":", 1)
            known[key] = AdapterInfo(adapter_id, source, "host", adapter.max_rank, adapter.nbytes)
        for key, slot in self._resident.items():
            source, adapter_id = key.split(":", 1)
            info = known.get(key) or AdapterInfo(adapter_id, source, "active")
            known[key] = dataclasses.replace(info, tier="active", slot=slot, rank=self.ranks[slot],
                                             requests=self._users[slot])
        return list(known.values())

    def activate(self, ref: AdapterRef) -> bool:
        """Copy a host-resident adapter into a slot ahead of its requests; False while every slot is busy."""
        slot = self.try_acquire(ref)
        if slot is None:
            return False
        self.release(slot)
        return True

    def unload(self, adapter_id: str, source: str) -> bool:
        """Drop the adapter from its slot and from host memory (its files stay on disk); False if neither held it.
        Refused while requests use it: they read its slot every step."""
        key = f"{source}:{adapter_id}"
        slot = self._resident.get(key)
        if slot is not None and self._users[slot]:
            raise AdapterInUse(f"adapter {adapter_id!r} serves {self._users[slot]} request(s) now; unload it when "
                               "they finish")
        if slot is not None:
            del self._resident[key]
            self.ranks[slot] = 0
        return self.host.remove(key) or slot is not None

    def _host_adapter(self, ref: AdapterRef) -> LoRAAdapter:
        if ref.merge is not None:
            return self.host.get_merged(ref.merge, ref.source, ref.token)
        return self.host.get(ref.adapter_id, ref.source, ref.token)

    def _vocabulary_slots(self, name: str, layer: Linear | VocabEmbedding) -> OutputLoRASlots | EmbeddingLoRASlots:
        in_features, out_features = _features(layer)
        kind = EmbeddingLoRASlots if isinstance(layer, VocabEmbedding) else OutputLoRASlots
        slots = kind(in_features, out_features, *self._slot_args)
        logger.info("allocated LoRA slots for %s: %.0f MB", name, (slots.a.nbytes + slots.b.nbytes) / 2**20)
        return slots

    def release(self, slot: int) -> None:
        self._users[slot] -= 1

    def _free_slot(self) -> int | None:
        used = set(self._resident.values())
        for slot in range(len(self.ranks)):
            if slot not in used:
                return slot
        for key, slot in self._resident.items():  # least recently used first
            if self._users[slot] == 0:
                del self._resident[key]
                self.slot_evictions += 1
                return slot
        return None

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        for name, layer in self.layers.items():
            module = adapter.modules.get(name)
            if module is not None:
                if layer.lora is None:
                    layer.lora = self._vocabulary_slots(name, layer)
                layer.lora.set_slot(slot, module.a, module.b)
            elif layer.lora is not None:
                layer.lora.clear_slot(slot)
        self.ranks[slot] = adapter.max_rank
        self.slot_loads += 1
