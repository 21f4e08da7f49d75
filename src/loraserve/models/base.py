"""The contract between the runner and every model family."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from transformers import PretrainedConfig

from loraserve.layers.attention import Attention


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only model over a flat, unpadded token batch.

    The runner enters a `ForwardContext` (layers/context.py) before calling `forward`; the model never sees
    requests, padding or the scheduler.
    """

    config: PretrainedConfig

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids and positions `[T]` int64 -> final hidden states `[T, hidden]` (after the last norm)."""
        ...

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden `[N, hidden]` -> logits `[N, vocab]` float32 (softcapping applied where the family has it), written
        into `out` where given."""
        ...

    def attention_layers(self) -> list[Attention]:
        """The attention modules in layer order, so the runner can bind each its KV cache."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the parameters; raises `ModelLoadError` on a missing tensor."""
        ...
