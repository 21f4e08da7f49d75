"""Paged attention against plain causal attention on contiguous tensors, across chunked prefill and decode steps."""

from __future__ import annotations

import math
import random

import pytest
import torch

from loraserve.engine.input_batch import SequenceChunk, build_step_inputs
from loraserve.layers.attention import Attention
from loraserve.layers.context import forward_context

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 8, 4


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, softcap: float | None):
    """Causal attention of the last `len(q)` positions over all of `k`, `v` ([L, H, D]), written from the definition."""
    total, new = k.shape[0], q.shape[0]
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(total - new, total)[:, None]
    k_pos = torch.arange(total)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(new, HEADS * HEAD_DIM)


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 5.0), (4, 5.0)])
def test_paged_attention_matches_contiguous(window: int | None, softcap: float | None) -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    layer = Attention(HEADS, KV_HEADS, HEAD_DIM, 1 / math.sqrt(HEAD_DIM), window, softcap)
    num_blocks = 64
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    layer.bind_cache(torch.zeros(shape), torch.zeros(shape))
    free = list(range(num_blocks))
    rng.shuffle(free)  # non-contiguous block tables
    lengths = [3, 9, 14]
    seqs = [
        {
            "q": torch.randn(n + 5, HEADS, HEAD_DIM),
            "k": torch.randn(n + 5, KV_HEADS, HEAD_DIM),
            "v": torch.randn(n + 5, KV_HEADS, HEAD_DIM),
            "blocks": [free.pop() for _ in range(5)],
            "done": 0,
            "prompt": n,
        }
        for n in lengths
    ]
    # step plan: tokens per sequence per step: chunked prefill of the longest, then decodes mixed with the rest
    plan = [[3, 5, 6], [1, 4, 8], [1, 1, 1], [1, 1, 1]]
    for step in plan:
        chunks, spans = [], []
        for seq, n in zip(seqs, step):
            chunks.append(SequenceChunk(list(range(n)), seq["done"], seq["blocks"]))
            spans.append((seq["done"], seq["done"] + n))
        inputs = build_step_inputs(chunks, BLOCK, torch.device("cpu"))
        q = torch.cat([s["q"][a:b] for s, (a, b) in zip(seqs, spans)]).reshape(-1, HEADS * HEAD_DIM)
        k = torch.cat([s["k"][a:b] for s, (a, b) in zip(seqs, spans)]).reshape(-1, KV_HEADS * HEAD_DIM)
        v = torch.cat([s["v"][a:b] for s, (a, b) in zip(seqs, spans)]).reshape(-1, KV_HEADS * HEAD_DIM)
        with forward_context(inputs.context):
            out = layer(q, k, v)
        offset = 0
        for seq, (a, b) in zip(seqs, spans):
            expected = reference(seq["q"][a:b], seq["k"][:b], seq["v"][:b], window, softcap)
            torch.testing.assert_close(out[offset : offset + b - a], expected, rtol=1e-5, atol=1e-5)
            offset += b - a
            seq["done"] = b


@pytest.mark.parametrize("heads, kv_heads", [(4, 1), (4, 2), (6, 3), (2, 2)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_decode_matmuls_equal_attention_by_definition(heads: int, kv_heads: int, softcap: float | None) -> None:
    """The CPU decode form (query heads of a KV head as rows of one matmul) against attention written out per head,
    with query head h reading KV head h // (heads / kv_heads) and masked keys left out."""
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    batch, keys_len, dim, scale = 5, 7, 16, 0.25
    query = torch.randn(batch, heads, 1, dim, generator=g)
    keys = torch.randn(batch, kv_heads, keys_len, dim, generator=g)
    values = torch.randn(batch, kv_heads, keys_len, dim, generator=g)
    lengths = [7, 1, 4, 6, 3]
    mask = torch.zeros(batch, 1, 1, keys_len, dtype=torch.bool)
    for b, length in enumerate(lengths):
        mask[b, ..., :length] = True
    layer = Attention(heads, kv_heads, dim, scale, logit_softcap=softcap)
    got = layer._decode(query, keys, values, mask)
    group = heads // kv_heads
    for b, length in enumerate(lengths):
        for h in range(heads):
            scores = keys[b, h // group, :length] @ query[b, h, 0] * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            want = torch.softmax(scores, dim=0) @ values[b, h // group, :length]
            torch.testing.assert_close(got[b, h, 0], want, rtol=1e-5, atol=1e-5)
