"""Per-layer LoRA storage: each resident adapter that targets a layer holds exactly its rank there, nothing else.

An adapter is known to a layer by its slot id (a small integer the residency assigns). A layer an adapter does not
target holds nothing for it and skips its tokens, so PEFT's default q/v-only adapters cost nothing in the MLP.

Three shapes of layer, three layouts:
- `ProjectionLoRA`, the decoder projections: every step, every token. One arena per layer, A rows `[rows, in]`
  and B transposed `[rows, out]`, each adapter a contiguous run of `rank` rows, so the batched forms of `lora_ops`
  read every adapter of a step from one base pointer. The arena grows with the ranks placed in it and shrinks when
  adapters leave, compacting as it does.
- `OutputLoRA`, the lm_head: its B is vocabulary-sized; each adapter keeps its own `[r, vocab]` block and only the
  rows projected to logits (one per sampled sequence) pay, per adapter segment.
- `EmbeddingLoRA`, the token embedding: A is vocabulary-sized, kept transposed `[vocab, r]` so a step gathers only
  its own tokens' rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.layers.context import get_forward_context
from loraserve.layers.lora_kernel import add_lora_, fused_lora_available
from loraserve.layers.lora_ops import (
    DENSE_UNITS_PER_SEGMENT,
    LayerSegments,
    LoRABatch,
    dense_add_,
    segmented_add_,
    uniform_delta,
)

_ROW_ALIGN = 16  # arena capacity is a multiple of this many rows
_FREE_ROW = -2  # the slot id `column_slots` gives a free arena row; tokens use -1 (base) or a slot >= 0


def _round_up(rows: int) -> int:
    return -(-rows // _ROW_ALIGN) * _ROW_ALIGN


class ProjectionLoRA:
    """Attached to a decoder `Linear` as its `lora`: the arena of every resident adapter that targets it."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        self.a = torch.zeros(0, in_features, dtype=dtype, device=device)  # [capacity, in]
        self.b = torch.zeros(0, out_features, dtype=dtype, device=device)  # [capacity, out]: B transposed
        self.placements: dict[int, tuple[int, int]] = {}  # slot -> (first arena row, rank)
        self._column_slots: torch.Tensor | None = None
        self._view: _ArenaView | None = None

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes

    @property
    def used_rows(self) -> int:
        return sum(rank for _, rank in self.placements.values())

    def place(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Store one adapter's A `[r, in]` and B `[out, r]` (scale folded in) for `slot`."""
        rank = a.shape[0]
        offset = self._free_run(rank)
        self.a[offset : offset + rank].copy_(a)
        self.b[offset : offset + rank].copy_(b.T)
        self.placements[slot] = (offset, rank)
        self._column_slots = None
        self._view = None

    def remove(self, slot: int) -> None:
        if self.placements.pop(slot, None) is None:
            return
        self._column_slots = None
        self._view = None
        used = self.used_rows
        if self.a.shape[0] > _ROW_ALIGN and used < self.a.shape[0] // 2:
            self._relayout(_round_up(used + used // 4))

    def _free_run(self, rank: int) -> int:
        """The first arena row of a free run of `rank` rows, compacting or growing the arena when none is free."""
        capacity = self.a.shape[0]
        cursor = 0
        for offset, held in sorted(self.placements.values()):
            if offset - cursor >= rank:
                return cursor
            cursor = offset + held
        if capacity - cursor >= rank:
            return cursor
        used = self.used_rows
        if used + rank > capacity:
            capacity = _round_up(max(used + rank, capacity + capacity // 4))
        self._relayout(capacity)
        return used

    def _relayout(self, capacity: int) -> None:
        """Copy the placed adapters, in order and without gaps, into arenas of `capacity` rows."""
        a = self.a.new_zeros(capacity, self.a.shape[1])
        b = self.b.new_zeros(capacity, self.b.shape[1])
        cursor = 0
        for slot, (offset, rank) in sorted(self.placements.items(), key=lambda item: item[1][0]):
            a[cursor : cursor + rank].copy_(self.a[offset : offset + rank])
            b[cursor : cursor + rank].copy_(self.b[offset : offset + rank])
            self.placements[slot] = (cursor, rank)
            cursor += rank
        self.a, self.b = a, b
        self._column_slots = None
        self._view = None

    def column_slots(self) -> torch.Tensor:
        """`[W]` int64: the slot owning each arena row up to the last placed one (`_FREE_ROW` where free)."""
        if self._column_slots is None:
            width = max(offset + rank for offset, rank in self.placements.values())
            owners = torch.full((width,), _FREE_ROW, dtype=torch.int64)
            for slot, (offset, rank) in self.placements.items():
                owners[offset : offset + rank] = slot
            self._column_slots = owners.to(self.a.device)
        return self._column_slots

    def _arena_view(self, batch: LoRABatch) -> _ArenaView:
        """Where this layer holds each of the batch's slots, kept while the batch's slots and this layer's
        placements stay as they are: consecutive decode steps of the same requests reuse it, layer by layer."""
        view = self._view
        if view is None or view.slot_order != batch.slot_order:
            placed = [self.placements.get(slot, (0, 0)) for slot in batch.slot_order]
            offsets, ranks = [offset for offset, _ in placed], [rank for _, rank in placed]
            view = _ArenaView(batch.slot_order, offsets, ranks, torch.tensor(offsets, dtype=torch.int64),
                              torch.tensor(ranks, dtype=torch.int64), any(ranks))
            self._view = view
        return view

    def segments(self, batch: LoRABatch) -> LayerSegments:
        view = self._arena_view(batch)
        placed = [(start, stop, offset, rank)
                  for (_, start, stop), offset, rank in zip(batch.segments, view.offsets, view.ranks) if rank]
        return LayerSegments(placed, view.offsets, view.ranks)

    def adds_to_step(self) -> bool:
        batch = get_forward_context().lora
        return batch is not None and any(slot in self.placements for slot, _, _ in batch.segments)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = get_forward_context().lora
        if batch is None or not self.placements:
            return y
        fused = fused_lora_available(x.device)
        if batch.uniform_slot is not None and not fused:
            placement = self.placements.get(batch.uniform_slot)
            if placement is None:
                return y
            return y.add_(uniform_delta(x, self.a, self.b, *placement).to(y.dtype))
        view = self._arena_view(batch)
        if not view.any_placed:
            return y
        if fused:  # for one adapter too: its two small bf16 matmuls cost more than one call of the op
            return add_lora_(y, x, self.a, self.b, batch.rows, batch.seg_starts, view.offsets_tensor,
                             view.ranks_tensor)
        layer = self.segments(batch)
        width = self.column_slots().shape[0]
        if len(layer.placed) > 1 and x.shape[0] * width <= DENSE_UNITS_PER_SEGMENT * len(layer.placed):
            return dense_add_(y, x, self.a, self.b, batch, self.column_slots())
        return segmented_add_(y, x, self.a, self.b, batch, layer)


@dataclass(frozen=True)
class _ArenaView:
    """One layer's arena rows for a batch's slots, in the batch's segment order (rank 0: not targeted here)."""

    slot_order: tuple[int, ...]
    offsets: list[int]
    ranks: list[int]
    offsets_tensor: torch.Tensor  # int64 on the CPU: the fused op's index arguments
    ranks_tensor: torch.Tensor
    any_placed: bool


class _BlockPerAdapter:
    """A pair of tensors per slot, laid out by the subclass's `place`: for the vocabulary-sized layers, where an
    adapter's block is large and only its own rows ever read it."""

    def __init__(self) -> None:
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())

    def remove(self, slot: int) -> None:
        self.weights.pop(slot, None)

    def adds_to_step(self) -> bool:
        batch = get_forward_context().lora
        return batch is not None and any(slot in self.weights for slot, _, _ in batch.segments)


class OutputLoRA(_BlockPerAdapter):
    """Attached to the lm_head: per slot A `[r, in]` and B transposed `[r, vocab]` (scale folded in)."""

    def place(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        self.weights[slot] = (a.clone(), b.T.contiguous())

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = get_forward_context().lora
        if batch is None:
            return y
        for slot, start, stop in batch.segments:
            weights = self.weights.get(slot)
            if weights is not None:
                rows = batch.rows[start:stop]
                delta = (x[rows] @ weights[0].T) @ weights[1]
                y.index_put_((rows,), delta.to(y.dtype), accumulate=True)
        return y


class EmbeddingLoRA(_BlockPerAdapter):
    """Attached to the token embedding: per slot A transposed `[vocab, r]` and B `[hidden, r]`.

    A token's row of A is what multiplying A by its one-hot input selects, so each segment gathers its tokens' rows
    and runs one matmul with its B.
    """

    def place(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        self.weights[slot] = (a.T.contiguous(), b.clone())

    def add_delta(self, token_ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch: LoRABatch | None = get_forward_context().lora
        if batch is None:
            return y
        for slot, start, stop in batch.segments:
            weights = self.weights.get(slot)
            if weights is not None:
                rows = batch.rows[start:stop]
                delta = weights[0][token_ids[rows]] @ weights[1].T
                y.index_put_((rows,), delta.to(y.dtype), accumulate=True)
        return y
