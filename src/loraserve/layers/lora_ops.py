"""Batched LoRA deltas for a flat token batch where each token may use a different adapter slot.

`LoRABatch` is built once per step by the runner. Four implementations of the same sum, checked against each other:

- the reference loop over tokens (the test oracle);
- uniform: every token of the step uses one adapter: one matmul pair over the batch as it is;
- segmented: one pair of matmuls per adapter segment at the adapter's true rank. Few long segments (prefill, or one
  adapter for the whole batch) cost one matmul pair each;
- dense: one pair of matmuls for the whole batch over every slot in use, `(x A_all^T * mask) B_all^T`, where the mask
  keeps each token's own slot. It trades FLOPs (every token against every slot in use) for a fixed 3 ops per layer.
  On this CPU a Python loop over 8-32 segments, or gathering a copy of each token's A and B for a bmm, costs 3-5 ms
  per decoder layer at 32 tokens; the dense form costs about 1.8 ms with 32 slots of rank 16, and less with fewer.

Slot buffers are zero past each adapter's rank, so both batched forms are exact for mixed ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# The dense form wins while tokens x slot width stays under this many units per segment (measured on Gemma 3 270M
# shapes, 2 cores, bf16: dense ~ 0.3 ms + 5.5e-5 ms x tokens x width per layer, segmented ~ 0.65 ms per segment).
DENSE_UNITS_PER_SEGMENT = 16384


@dataclass
class LoRABatch:
    token_slots: torch.Tensor  # [T] int64: each token's slot, -1 = base model
    rows: torch.Tensor  # [n] int64: flat indices of the tokens that use an adapter, grouped by slot
    segments: list[tuple[int, int, int]]  # (slot, start, stop) over `rows`
    ranks: list[int]  # true rank per slot (0 = empty)
    slots_in_use: int  # 1 + the highest slot any token uses: the dense form reads slots [0, slots_in_use)
    uniform_slot: int | None  # the one slot every token of the step uses (no gather, no scatter needed), if any
    _masks: dict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, token_slots: list[int], ranks: list[int], device: torch.device) -> LoRABatch | None:
        """From each token's slot (-1 = base model); None when no token uses an adapter."""
        order = sorted((slot, i) for i, slot in enumerate(token_slots) if slot >= 0)
        if not order:
            return None
        segments, start = [], 0
        for end in range(1, len(order) + 1):
            if end == len(order) or order[end][0] != order[start][0]:
                segments.append((order[start][0], start, end))
                start = end
        return cls(
            token_slots=torch.tensor(token_slots, dtype=torch.int64, device=device),
            rows=torch.tensor([i for _, i in order], dtype=torch.int64, device=device),
            segments=segments,
            ranks=ranks,
            slots_in_use=order[-1][0] + 1,
            uniform_slot=order[0][0] if len(segments) == 1 and len(order) == len(token_slots) else None,
        )

    def use_dense(self, max_rank: int) -> bool:
        width = self.slots_in_use * max_rank
        return len(self.segments) > 1 and len(self.token_slots) * width <= DENSE_UNITS_PER_SEGMENT * len(self.segments)

    def slot_mask(self, max_rank: int, dtype: torch.dtype) -> torch.Tensor:
        """`[T, slots_in_use * max_rank]`: 1 on the rank columns of each token's own slot; built once per step."""
        key = (max_rank, dtype)
        if key not in self._masks:
            tokens = len(self.token_slots)
            mask = torch.zeros(tokens, self.slots_in_use + 1, max_rank, dtype=dtype, device=self.token_slots.device)
            # base-model tokens (-1) mark the extra last column block, which is cut off below
            mask[torch.arange(tokens, device=mask.device), self.token_slots] = 1
            self._masks[key] = mask[:, : self.slots_in_use].reshape(tokens, -1)
        return self._masks[key]


def dense_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """x `[T, in]`, a `[S, r_max, in]`, b `[out, S, r_max]` -> the delta for every token `[T, out]` (zero rows for
    base-model tokens)."""
    slots, max_rank, d_in = a.shape
    width = batch.slots_in_use * max_rank
    shrunk = F.linear(x, a.view(slots * max_rank, d_in)[:width]) * batch.slot_mask(max_rank, x.dtype)
    return F.linear(shrunk, b.view(b.shape[0], slots * max_rank)[:, :width])


def uniform_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """Every token uses `batch.uniform_slot`: one matmul pair at its true rank over `x` as it is `[T, out]`."""
    slot = batch.uniform_slot
    rank = batch.ranks[slot]
    return F.linear(F.linear(x, a[slot, :rank]), b[:, slot, :rank])


def segmented_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """The delta rows `[n, out]` for `batch.rows`."""
    out = x.new_empty(batch.rows.shape[0], b.shape[0])
    for slot, start, stop in batch.segments:
        rank = batch.ranks[slot]
        inputs = x[batch.rows[start:stop]]
        out[start:stop] = (inputs @ a[slot, :rank].T) @ b[:, slot, :rank].T
    return out


def reference_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """One token at a time, straight from the definition: the delta rows `[n, out]` for `batch.rows`."""
    rows = []
    for row, slot in zip(batch.rows.tolist(), batch.token_slots[batch.rows].tolist()):
        rank = batch.ranks[slot]
        rows.append(b[:, slot, :rank] @ (a[slot, :rank] @ x[row]))
    return torch.stack(rows)
