"""Paged attention against plain causal attention on contiguous tensors, across chunked prefill and decode steps."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch

from loraserve import kernels
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


def _decode_op() -> Callable:
    op = kernels.compiled_op("decode_attention_")
    if op is None:
        pytest.skip(f"compiled ops unavailable: {kernels.why_unavailable()}")
    return op


def _paged_cache(
    kv_lens: list[int], kv_heads: int, dim: int, dtype: torch.dtype, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K and V caches `[slots, kv_heads, dim]` and each sequence's slot table in shuffled 16-slot blocks, padded with
    slot 0 past its length (as `build_step_inputs` pads)."""
    block = 16
    num_blocks = sum(-(-n // block) for n in kv_lens) + 3
    k_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block, kv_heads, dim, generator=g).to(dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    slots = torch.zeros(len(kv_lens), max(kv_lens), dtype=torch.int64)
    for b, n in enumerate(kv_lens):
        blocks = torch.tensor([free.pop() for _ in range(-(-n // block))])
        positions = torch.arange(n)
        slots[b, :n] = blocks[positions // block] * block + positions % block
    return k_cache, v_cache, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("dim", [64, 256, 80])
@pytest.mark.parametrize("window, softcap", [(None, None), (37, None), (None, 20.0), (5, 20.0)])
def test_decode_op_equals_attention_by_definition(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, window: int | None, softcap: float | None
) -> None:
    """The compiled decode op, reading K and V in place from a paged cache for rows scattered through the flat batch,
    against attention written out per head in fp64 and against the torch form. fp32: within 1e-5. bf16: within one
    bf16 step (2^-7 relative) of both, as each rounds an fp32 result once."""
    op = _decode_op()
    g = torch.Generator().manual_seed(heads * 1000 + kv_heads * 100 + dim)
    kv_lens = [1, 600, 17, 2, 129, 64, 33, 599]
    positions = [n - 1 for n in kv_lens]
    positions[2] = 9  # a query before the end of its keys: the causal bound, not kv_lens, cuts it
    batch, tokens, scale = len(kv_lens), len(kv_lens) + 5, dim**-0.5
    k_cache, v_cache, slots = _paged_cache(kv_lens, kv_heads, dim, dtype, g)
    q = (torch.randn(tokens, heads, dim, generator=g) * 2).to(dtype)
    rows = torch.randperm(tokens, generator=g)[:batch]
    out = torch.full_like(q, 7.0)
    op(out, q, k_cache, v_cache, rows, slots, torch.tensor(kv_lens), torch.tensor(positions), scale, softcap or 0.0,
       window or 0)

    untouched = torch.ones(tokens, dtype=torch.bool)
    untouched[rows] = False
    assert bool((out[untouched] == 7.0).all())
    group = heads // kv_heads
    key_pos = torch.arange(slots.shape[1])
    visible = (key_pos < torch.tensor(kv_lens)[:, None]) & (key_pos <= torch.tensor(positions)[:, None])
    if window is not None:
        visible &= (torch.tensor(positions)[:, None] - key_pos) < window
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    for b in range(batch):
        seen = slots[b, visible[b]]
        for h in range(heads):
            keys, values = k_cache[seen, h // group].double(), v_cache[seen, h // group].double()
            scores = keys @ q[rows[b], h].double() * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            want = torch.softmax(scores, dim=0) @ values
            torch.testing.assert_close(out[rows[b], h].double(), want, **tol)
    layer = Attention(heads, kv_heads, dim, scale, window, softcap)
    torch_form = layer._decode(q[rows].unsqueeze(2), k_cache[slots].transpose(1, 2), v_cache[slots].transpose(1, 2),
                               visible[:, None, None, :])
    torch.testing.assert_close(out[rows], torch_form.squeeze(2), **tol)


@pytest.mark.parametrize("window, softcap", [(None, None), (6, 5.0)])
def test_decode_group_takes_the_op_with_the_torch_forms_numerics(
    window: int | None, softcap: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode group through the layer (its query rows, positions and slot table as `build_step_inputs` makes them)
    gives the torch form's result on the same values in fp32 (SDPA past DECODE_MATMUL_MAX_KEYS, whose bf16 form rounds
    on the way), rounded to bf16: within one bf16 step."""
    _decode_op()
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, block = 4, 1, 256, 16
    layer = Attention(heads, kv_heads, dim, dim**-0.5, window, softcap)
    lengths = [3, 700, 40, 1]
    num_blocks = sum(-(-n // block) for n in lengths)
    free = torch.randperm(num_blocks, generator=g).tolist()
    chunks = [SequenceChunk([0], n - 1, [free.pop() for _ in range(-(-n // block))]) for n in lengths]
    group = build_step_inputs(chunks, block, torch.device("cpu")).context.attention_groups[0]
    k_flat = torch.randn(num_blocks * block, kv_heads, dim, generator=g).bfloat16()
    v_flat = torch.randn(num_blocks * block, kv_heads, dim, generator=g).bfloat16()
    q = torch.randn(len(lengths), heads, dim, generator=g).bfloat16()
    got, want = torch.empty_like(q), torch.empty_like(q, dtype=torch.float32)
    layer._attend_group(group, q, k_flat, v_flat, got)
    monkeypatch.setattr(kernels, "compiled_op", lambda name: None)
    layer._attend_group(group, q.float(), k_flat.float(), v_flat.float(), want)
    torch.testing.assert_close(got, want.bfloat16(), rtol=2**-7, atol=1e-5)
