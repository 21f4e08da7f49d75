"""Per-layer LoRA slot buffers: the running batch's adapters live here, one slot each; -1 means no adapter."""

from __future__ import annotations

import torch

from loraserve.layers.context import get_forward_context
from loraserve.layers.lora_ops import dense_delta, segmented_delta, uniform_delta


class LoRASlots:
    """Attached to a `Linear` as its `lora`; A `[slots, r_max, in]`, B `[out, slots, r_max]` (scale folded in).

    Both lay the slots out so that `A.view(slots * r_max, in)` and `B.view(out, slots * r_max)` are the concatenated
    adapters the dense form multiplies by in one matmul each, with no copy.
    """

    def __init__(self, in_features: int, out_features: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.a = torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(out_features, num_slots, max_rank, dtype=dtype, device=device)

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        rank = a.shape[0]
        if rank > self.a.shape[1]:
            raise ValueError(f"rank {rank} exceeds the slot capacity {self.a.shape[1]} (raise --max-lora-rank)")
        self.clear_slot(slot)
        self.a[slot, :rank].copy_(a)
        self.b[:, slot, :rank].copy_(b)

    def clear_slot(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[:, slot].zero_()

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = get_forward_context().lora
        if batch is None:
            return y
        if batch.uniform_slot is not None:
            return y.add_(uniform_delta(x, self.a, self.b, batch).to(y.dtype))
        if batch.use_dense(self.a.shape[1]):
            return y.add_(dense_delta(x, self.a, self.b, batch).to(y.dtype))
        delta = segmented_delta(x, self.a, self.b, batch)
        # index_put_ with accumulate: microseconds here, where index_add takes milliseconds on the CPU
        return y.index_put_((batch.rows,), delta.to(y.dtype), accumulate=True)
