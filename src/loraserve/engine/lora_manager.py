"""Which adapters sit in the model's LoRA slots: loaded on first use, the least recently used idle one evicted.

This is the device tier only; a host-memory and disk tier with loading off the step loop are still to come. Slots are
filled from the step loop's thread, between steps, so a forward never reads a slot being written.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path

import torch
from torch import nn

from loraserve.adapters.peft import LoRAAdapter, load_peft_adapter
from loraserve.adapters.sources import resolve_adapter
from loraserve.errors import AdapterLoadError, Overloaded
from loraserve.layers.linear import Linear
from loraserve.layers.lora import LoRASlots


class LoRAManager:
    def __init__(self, model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device, cache_dir: Path, s3_endpoint_url: str | None = None) -> None:
        # Every projection inside the decoder layers takes LoRA; the lm_head's slots would cost vocab x rank each.
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear) and name != "lm_head"}
        for layer in self.layers.values():
            layer.lora = LoRASlots(layer.in_features, layer.out_features, num_slots, max_rank, dtype, device)
        self.projections = {name: (m.in_features, m.out_features) for name, m in self.layers.items()}
        self.dtype = dtype
        self.max_rank = max_rank
        self.cache_dir = cache_dir
        self.s3_endpoint_url = s3_endpoint_url
        self.ranks = [0] * num_slots  # the largest rank held by each slot (0 = empty)
        self._resident: OrderedDict[str, int] = OrderedDict()  # adapter key -> slot, least recently used first
        self._users: Counter[int] = Counter()  # requests in flight per slot

    def acquire(self, adapter_id: str, source: str, token: str | None) -> int:
        """The slot holding the adapter, loading it if needed; the caller must `release` it when done."""
        key = f"{source}:{adapter_id}"
        slot = self._resident.get(key)
        if slot is None:
            adapter = load_peft_adapter(
                resolve_adapter(adapter_id, source, token, self.cache_dir, self.s3_endpoint_url), adapter_id,
                self.projections, self.dtype,
            )
            if adapter.max_rank > self.max_rank:
                raise AdapterLoadError(f"adapter {adapter_id!r} has rank {adapter.max_rank}; this server's slots hold "
                                       f"at most {self.max_rank} (--max-lora-rank)")
            slot = self._free_slot()
            self._write(slot, adapter)
            self._resident[key] = slot
        self._resident.move_to_end(key)
        self._users[slot] += 1
        return slot

    def resident(self) -> list[str]:
        """Ids of the adapters in slots now, most recently used last."""
        return [key.split(":", 1)[1] for key in self._resident]

    def release(self, slot: int) -> None:
        self._users[slot] -= 1

    def _free_slot(self) -> int:
        used = set(self._resident.values())
        for slot in range(len(self.ranks)):
            if slot not in used:
                return slot
        for key, slot in self._resident.items():  # least recently used first
            if self._users[slot] == 0:
                del self._resident[key]
                return slot
        raise Overloaded(f"all {len(self.ranks)} adapter slots are held by requests in flight")

    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        for name, layer in self.layers.items():
            module = adapter.modules.get(name)
            if module is None:
                layer.lora.clear_slot(slot)
            else:
                layer.lora.set_slot(slot, module.a, module.b)
        self.ranks[slot] = adapter.max_rank
