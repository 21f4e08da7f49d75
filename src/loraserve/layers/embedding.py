"""The token embedding every model file uses: a plain lookup table that an adapter's embedding LoRA can extend.

Like `Linear`, the model only builds it; whether a per-token adapter delta is added is decided outside the model by
attaching `lora`, and whether its rows come from a quantized tied lm_head by `set_quantized`. Its parameter is named
`weight`, so checkpoints and PEFT address `model.embed_tokens` as usual.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingLoRADelta(Protocol):
    """What the adapter runtime attaches: adds each token's adapter delta to its embedding row."""

    def add_delta(self, token_ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class QuantizedTable(Protocol):
    """A quantized weight that can also serve rows as an embedding table (int8 w8a8: a tied lm_head's codes)."""

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor: ...


class VocabEmbedding(nn.Module):
    """`weight[token_ids]`, with an optional batched LoRA delta added on top."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.lora: EmbeddingLoRADelta | None = None
        self.quantized: QuantizedTable | None = None
        self.table_dtype: torch.dtype | None = None  # what `quantized` rows are returned as

    def set_quantized(self, table: QuantizedTable) -> None:
        """Look rows up in `table` (a tied lm_head's quantized weight) and drop the float table."""
        self.table_dtype = self.weight.dtype
        self.quantized = table
        self.register_parameter("weight", None)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            y = self.quantized.lookup(token_ids, self.table_dtype)
        else:
            y = F.embedding(token_ids, self.weight)
        if self.lora is not None:
            y = self.lora.add_delta(token_ids, y)
        return y

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"
