"""Batched LoRA deltas for a flat token batch where each token may use a different adapter slot.

`LoRABatch` is built once per step by the runner: which slot each token uses, the tokens grouped by slot. Each
layer then runs over its own adapters only (see `layers.lora`): a slot whose adapter does not target the layer is
skipped, and each slot runs at its rank for that layer. The forms of the same sum, checked against each other:

- the reference loop over tokens (the test oracle);
- uniform: every token of the step uses one adapter: one matmul pair over the batch as it is (where the fused op is
  not built);
- segmented: one pair of matmuls per adapter segment. Few long segments (prefill) cost one matmul pair each;
- fused: one compiled call per layer for every segment (`lora_kernel`), where it is built: on the CPU it beats
  the other forms at every batch shape measured, one adapter included (see RESULTS.md, the fused LoRA op), so it
  serves every step that uses an adapter;
- dense: one matmul pair over the layer's whole arena, each token keeping only its own adapter's columns by
  selection. It trades FLOPs (every token against every resident adapter) for a fixed few ops per layer, and is the
  many-segment form where the fused op is not built (CUDA, or no compiler).

Selection, never multiplication by a 0/1 mask: an `inf` in one adapter must not become `nan` in another's row. The
second matmul of the dense form still multiplies other adapters' B by zero, which is why adapters are checked finite
when they are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The dense form wins while tokens x arena rows stays under this many units per segment (see RESULTS.md, LoRA).
DENSE_UNITS_PER_SEGMENT = 16384


@dataclass
class LoRABatch:
    """Which adapter slot each token (or logits row) uses; built once per step, read by every LoRA layer."""

    token_slots: torch.Tensor  # [T] int64: each token's slot, -1 = base model
    rows: torch.Tensor  # [n] int64: flat indices of the tokens that use an adapter, grouped by slot
    segments: list[tuple[int, int, int]]  # (slot, start, stop) over `rows`
    uniform_slot: int | None  # the one slot every token of the step uses (no gather, no scatter needed), if any
    slot_order: tuple[int, ...] = ()  # the segments' slots in order: what a layer's view of the batch depends on
    _seg_starts: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device) -> LoRABatch | None:
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
            slot_order=tuple(slot for slot, _, _ in segments),
            uniform_slot=order[0][0] if len(segments) == 1 and len(order) == len(token_slots) else None,
        )

    @property
    def seg_starts(self) -> torch.Tensor:
        """`[S + 1]` int64: segment s covers `rows[seg_starts[s]:seg_starts[s + 1]]`; shared by every layer."""
        if self._seg_starts is None:
            bounds = [start for _, start, _ in self.segments] + [self.segments[-1][2]]
            self._seg_starts = torch.tensor(bounds, dtype=torch.int64, device=self.rows.device)
        return self._seg_starts


@dataclass(frozen=True)
class LayerSegments:
    """One layer's view of a batch: the segments of the adapters that target it, with their rows in the arena."""

    placed: list[tuple[int, int, int, int]]  # (start, stop, arena offset, rank) over `batch.rows`
    offsets: list[int]  # per batch segment: arena offset (0 where the adapter does not target the layer)
    ranks: list[int]  # per batch segment: rank in this layer (0 = skipped)


def uniform_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offset: int, rank: int) -> torch.Tensor:
    """Every token uses one adapter at arena rows `[offset, offset + rank)`: one matmul pair over `x` `[T, out]`."""
    return (x @ a[offset : offset + rank].T) @ b[offset : offset + rank]


def segmented_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch,
                   layer: LayerSegments) -> torch.Tensor:
    """One matmul pair per placed segment, added into `y`'s rows."""
    for start, stop, offset, rank in layer.placed:
        rows = batch.rows[start:stop]
        delta = (x[rows] @ a[offset : offset + rank].T) @ b[offset : offset + rank]
        # index_put_ with accumulate: microseconds here, where index_add takes milliseconds on the CPU
        y.index_put_((rows,), delta.to(y.dtype), accumulate=True)
    return y


def dense_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch,
               column_slots: torch.Tensor) -> torch.Tensor:
    """Every token against the arena's first `W` rows, each keeping its own adapter's columns by selection.

    `column_slots` `[W]` int64 names the slot owning each arena row (-2 for a free row, never equal to a token's
    slot, and -1 rows do not exist), so the mask is one comparison.
    """
    width = column_slots.shape[0]
    shrunk = x @ a[:width].T
    keep = batch.token_slots[:, None] == column_slots[None, :]
    shrunk = torch.where(keep, shrunk, shrunk.new_zeros(()))
    return y.add_((shrunk @ b[:width]).to(y.dtype))


def reference_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch,
                    placements: dict[int, tuple[int, int]]) -> torch.Tensor:
    """One token at a time, straight from the definition: the full delta `[T, out]` (zero for base rows and for
    adapters that do not target the layer)."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float32)
    for row, slot in enumerate(batch.token_slots.tolist()):
        if slot in placements:
            offset, rank = placements[slot]
            out[row] = b[offset : offset + rank].float().T @ (a[offset : offset + rank].float() @ x[row].float())
    return out
