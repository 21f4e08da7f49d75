"""Paged attention over a flat token batch.

Each layer owns two cache tensors `[num_blocks, block_size, kv_heads, head_dim]` bound by the runner. A step writes
the new tokens' K and V at their slots, then, for each attention group of the step, gathers the keys each sequence
sees through its block table and runs one padded attention call. The gather costs a copy of the visible cache; on the
CPU this is cheaper than a Python loop over sequences, and a fused paged kernel can replace it on CUDA.

Decode groups (one query per sequence) on the CPU run the compiled `decode_attention_` op, which reads each visible K
and V row where it lies in the cache (no gathered copies) and is faster than both torch forms below at every context
measured. Where the extension is unavailable they skip SDPA for two plain matmuls with the query heads of each KV
head as the rows of one product, in fp32: torch's CPU flash kernel tiles for long queries and spends most of a
one-query call on that (benchmarks/RESULTS.md, decode attention, has the measurements). Longer contexts keep SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraserve import kernels
from loraserve.layers.context import AttentionGroup, get_forward_context

# Decode attention by matmuls up to this many keys per sequence (measured faster up to here), SDPA beyond.
DECODE_MATMUL_MAX_KEYS = 512


class Attention(nn.Module):
    """Scaled dot-product attention reading and writing the paged KV cache."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Attach this layer's slice of the KV pool (called once by the runner after sizing the pool)."""
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q `[T, heads * head_dim]`, k and v `[T, kv_heads * head_dim]` -> `[T, heads * head_dim]`."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("attention layer has no KV cache bound; the runner binds it before the first step")
        context = get_forward_context()
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k_flat = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, context.slot_mapping, k.view(num_tokens, self.num_kv_heads, self.head_dim))
        v_flat.index_copy_(0, context.slot_mapping, v.view(num_tokens, self.num_kv_heads, self.head_dim))
        out = q.new_empty(num_tokens, self.num_heads, self.head_dim)
        for group in context.attention_groups:
            self._attend_group(group, q, k_flat, v_flat, out)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _attend_group(
        self,
        group: AttentionGroup,
        q: torch.Tensor,
        k_flat: torch.Tensor,
        v_flat: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        if group.query_index.shape[1] == 1 and self._decode_in_place(group, q, k_flat, v_flat, out):
            return
        query = q[group.query_index].transpose(1, 2)  # [B, H, max_q, D]
        keys = k_flat[group.kv_slots].transpose(1, 2)  # [B, Hkv, max_kv, D]
        values = v_flat[group.kv_slots].transpose(1, 2)
        mask = group.mask(self.sliding_window)
        if query.shape[2] == 1 and query.device.type == "cpu" and keys.shape[2] <= DECODE_MATMUL_MAX_KEYS:
            attended = self._decode(query, keys, values, mask)
        elif self.logit_softcap is None:
            attended = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads
            )
        else:
            attended = self._softcapped(query, keys, values, mask)
        valid = group.query_valid
        out[group.query_index[valid]] = attended.transpose(1, 2)[valid]

    def _decode_in_place(
        self, group: AttentionGroup, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, out: torch.Tensor
    ) -> bool:
        """A decode group by the compiled op, which reads K and V where they lie in the cache rather than gathering
        copies of them; False where it does not apply (not the CPU, another dtype, no extension)."""
        if q.device.type != "cpu" or q.dtype not in kernels.OP_DTYPES or k_flat.dtype != q.dtype:
            return False
        op = kernels.compiled_op("decode_attention_")
        if op is None:
            return False
        op(out, q, k_flat, v_flat, group.query_index[:, 0], group.kv_slots, group.kv_lens, group.query_positions[:, 0],
           self.scale, self.logit_softcap or 0.0, self.sliding_window or 0)
        return True

    def _decode(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        """One query per sequence: `[B, H, 1, D]` as `[B, kv_heads, H / kv_heads, D]` (query head h reads KV head
        h // group, as in the reference's `repeat_kv`), scores and weights in fp32, the output cast back once."""
        batch, heads, _, dim = query.shape
        rows = query.reshape(batch, self.num_kv_heads, heads // self.num_kv_heads, dim).float()
        scores = torch.matmul(rows, keys.float().transpose(-1, -2)) * self.scale  # [B, kv_heads, group, max_kv]
        scores = self._capped(scores).masked_fill(~mask, float("-inf"))
        attended = torch.matmul(torch.softmax(scores, dim=-1), values.float())
        return attended.to(query.dtype).reshape(batch, heads, 1, dim)

    def _softcapped(
        self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention with tanh logit capping (Gemma 2), which the fused SDPA kernels do not offer."""
        groups = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
        scores = self._capped(torch.matmul(query, keys.transpose(-1, -2)) * self.scale)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(values.dtype)
        return torch.matmul(probs, values)

    def _capped(self, scores: torch.Tensor) -> torch.Tensor:
        """Gemma 2's tanh cap on attention logits, where the layer has one."""
        if self.logit_softcap is None:
            return scores
        return torch.tanh(scores / self.logit_softcap) * self.logit_softcap
