"""Per-layer LoRA slot buffers: the running batch's adapters live here, one slot each; -1 means no adapter.

Three shapes of layer, three layouts:
- `LoRASlots`, the decoder projections: every step, every token, so the batched forms of `lora_ops` apply;
- `OutputLoRASlots`, the lm_head: its B is vocabulary-sized, so each slot's B is one contiguous `[r, vocab]` block
  and only the rows being projected to logits (one per sampled sequence) pay, per adapter segment;
- `EmbeddingLoRASlots`, the token embedding: A is vocabulary-sized, stored transposed so a step gathers only its
  own tokens' rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraserve.layers.context import get_forward_context
from loraserve.layers.lora_ops import LoRABatch, dense_delta, segmented_delta, uniform_delta


def _check_rank(rank: int, capacity: int) -> None:
    if rank > capacity:
        raise ValueError(f"rank {rank} exceeds the slot capacity {capacity} (raise --max-lora-rank)")


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
        _check_rank(rank, self.a.shape[1])
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


class OutputLoRASlots:
    """Attached to the lm_head; A `[slots, r_max, in]`, B `[slots, r_max, vocab]` (scale folded in).

    Runs at each slot's own rank for this layer and skips slots whose adapter does not target it, so adapters
    without an lm_head LoRA cost nothing here.
    """

    def __init__(self, in_features: int, out_features: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.a = torch.zeros(num_slots, max_rank, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, max_rank, out_features, dtype=dtype, device=device)
        self.ranks = [0] * num_slots

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        rank = a.shape[0]
        _check_rank(rank, self.a.shape[1])
        self.a[slot, :rank].copy_(a)
        self.b[slot, :rank].copy_(b.T)
        self.ranks[slot] = rank

    def clear_slot(self, slot: int) -> None:
        self.ranks[slot] = 0  # the stale values past rank 0 are never read

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = get_forward_context().lora
        if batch is None:
            return y
        for slot, start, stop in batch.segments:
            rank = self.ranks[slot]
            if rank:
                rows = batch.rows[start:stop]
                delta = F.linear(x[rows], self.a[slot, :rank]) @ self.b[slot, :rank]
                y.index_put_((rows,), delta.to(y.dtype), accumulate=True)
        return y


class EmbeddingLoRASlots:
    """Attached to the token embedding; A transposed `[vocab, slots, r_max]`, B `[hidden, slots, r_max]`.

    A token's row of A is what multiplying A by its one-hot input selects, so the step gathers `[T, slots x r_max]`
    rows, masks each to its own slot and runs one matmul with every slot's B side by side: the dense form of
    `lora_ops` without its first matmul.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.a = torch.zeros(num_embeddings, num_slots, max_rank, dtype=dtype, device=device)
        self.b = torch.zeros(embedding_dim, num_slots, max_rank, dtype=dtype, device=device)

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        rank = a.shape[0]
        _check_rank(rank, self.a.shape[2])
        self.clear_slot(slot)
        self.a[:, slot, :rank].copy_(a.T)
        self.b[:, slot, :rank].copy_(b)

    def clear_slot(self, slot: int) -> None:
        self.a[:, slot].zero_()
        self.b[:, slot].zero_()

    def add_delta(self, token_ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch: LoRABatch | None = get_forward_context().lora
        if batch is None:
            return y
        vocab, slots, max_rank = self.a.shape
        width = batch.slots_in_use * max_rank
        rows = self.a.view(vocab, slots * max_rank)[:, :width][token_ids] * batch.slot_mask(max_rank, y.dtype)
        return y.add_(F.linear(rows, self.b.view(-1, slots * max_rank)[:, :width]))
