"""The token embedding every model file uses: a plain lookup table that an adapter's embedding LoRA can extend.

Like `Linear`, the model only builds it; whether a per-token adapter delta is added is decided outside the model by
attaching `lora`. Its parameter is named `weight`, so checkpoints and PEFT address `model.embed_tokens` as usual.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingLoRADelta(Protocol):
    """What the adapter runtime attaches: adds each token's adapter delta to its embedding row."""

    def add_delta(self, token_ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class VocabEmbedding(nn.Module):
    """`weight[token_ids]`, with an optional batched LoRA delta added on top."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.lora: EmbeddingLoRADelta | None = None

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        y = F.embedding(token_ids, self.weight)
        if self.lora is not None:
            y = self.lora.add_delta(token_ids, y)
        return y

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"
