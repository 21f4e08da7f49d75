"""Batched LoRA deltas for a flat token batch where each token may use a different adapter slot.

`LoRABatch` is built once per step by the runner. Three implementations of the same sum, checked against each other:
the reference loop over tokens (the test oracle), one matmul per adapter segment at the adapter's true rank (prefill:
many tokens per adapter), and a gather plus two batched matmuls (decode: about one token per adapter, where a Python
loop over adapters would dominate). Slot buffers are zero past each adapter's rank, so the gathered path is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoRABatch:
    rows: torch.Tensor  # [n] int64: flat indices of the tokens that use an adapter
    row_slots: torch.Tensor  # [n] int64: the slot each of those tokens uses
    segments: list[tuple[int, int, int]]  # (slot, start, stop) over `rows`, which are grouped by slot
    ranks: list[int]  # true rank per slot (0 = empty)
    gathered: bool  # use the gathered batched-matmul path this step

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
        rows = torch.tensor([i for _, i in order], dtype=torch.int64, device=device)
        slots = torch.tensor([s for s, _ in order], dtype=torch.int64, device=device)
        # Many short segments (decode) favour one gathered bmm; long segments (prefill) favour per-segment matmuls.
        gathered = len(order) < 4 * len(segments)
        return cls(rows, slots, segments, ranks, gathered)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """x `[T, in]`, slot buffers a `[S, r_max, in]` and b `[S, out, r_max]` -> the delta rows `[n, out]` for
    `batch.rows`."""
    if batch.gathered:
        return gathered_delta(x, a, b, batch)
    return segmented_delta(x, a, b, batch)


def gathered_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    inputs = x[batch.rows].unsqueeze(-1)  # [n, in, 1]
    shrunk = torch.bmm(a[batch.row_slots], inputs)  # [n, r_max, 1]
    return torch.bmm(b[batch.row_slots], shrunk).squeeze(-1)  # [n, out]


def segmented_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    out = x.new_empty(batch.rows.shape[0], b.shape[1])
    for slot, start, stop in batch.segments:
        rank = batch.ranks[slot]
        inputs = x[batch.rows[start:stop]]
        out[start:stop] = (inputs @ a[slot, :rank].T) @ b[slot, :, :rank].T
    return out


def reference_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    """One token at a time, straight from the definition; the oracle for the two paths above."""
    rows = []
    for row, slot in zip(batch.rows.tolist(), batch.row_slots.tolist()):
        rank = batch.ranks[slot]
        rows.append(b[slot, :, :rank] @ (a[slot, :rank] @ x[row]))
    return torch.stack(rows)
