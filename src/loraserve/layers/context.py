"""The one per-step channel from the runner into the layers.

The runner builds a `ForwardContext` once per step and enters it with `forward_context(...)`; attention layers
(and later the LoRA layers) read it with `get_forward_context()`. The previous context is restored on exit, so
nested or re-entrant forwards (a reference model run inside a test, say) never see stale metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from loraserve.layers.lora_ops import LoRABatch


@dataclass
class AttentionGroup:
    """Sequences whose attention runs as one padded batch.

    Decode rows (one query token each) form one group; each prefill chunk forms its own, so a long chunk never
    pads the decode rows up to its length.
    """

    # [B, max_q] int64: index into the flat token batch of each padded query position (0 where padded).
    query_index: torch.Tensor
    # [B, max_q] bool: which padded query positions hold a real token.
    query_valid: torch.Tensor
    # [B, max_kv] int64: flat KV-cache slot of each key position (0 where padded; masked out).
    kv_slots: torch.Tensor
    # [B, max_q] int64: absolute position of each query token (its key index within the sequence).
    query_positions: torch.Tensor
    # [B] int64: number of keys each sequence sees this step (cached + new).
    kv_lens: torch.Tensor
    # Masks per sliding window (None = full causal), built on first use and shared by all layers of the step.
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, max_q, max_kv] bool, True where a query may attend to a key (causal, in range, in window)."""
        cached = self._masks.get(sliding_window)
        if cached is not None:
            return cached
        key_pos = torch.arange(self.kv_slots.shape[1], device=self.kv_slots.device)
        q_pos = self.query_positions.unsqueeze(-1)  # [B, max_q, 1]
        allowed = (key_pos <= q_pos) & (key_pos < self.kv_lens[:, None, None])
        if sliding_window is not None:
            allowed &= (q_pos - key_pos) < sliding_window
        allowed &= self.query_valid.unsqueeze(-1)
        # A padded query row with no allowed key would make softmax produce NaN; let it see key 0 (discarded later).
        allowed[..., 0] |= ~self.query_valid
        mask = allowed.unsqueeze(1)
        self._masks[sliding_window] = mask
        return mask


@dataclass
class ForwardContext:
    """Everything a layer needs to know about the current step, beyond its input tensor."""

    # [T] int64: flat KV-cache slot (block_id * block_size + offset) where each new token's K and V are written.
    slot_mapping: torch.Tensor
    # Attention groups covering every token of the batch exactly once.
    attention_groups: list[AttentionGroup]
    # Which tokens use which adapter slot this step; None when no token uses one (read by `layers.lora`).
    lora: LoRABatch | None = None


_current: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    """The context of the step being run; layers call this, never the runner's internals."""
    if _current is None:
        raise RuntimeError("no forward context: layers must run inside `forward_context(...)`")
    return _current


@contextlib.contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    """Make `context` current for the duration of one forward pass, restoring the previous one afterwards."""
    global _current
    previous, _current = _current, context
    try:
        yield context
    finally:
        _current = previous
