"""Decode attention on the CPU: the compiled op `layers.attention` runs for one-query groups, reading K and V where they
lie in the paged cache, against the torch forms it falls back to (torch's SDPA, and the matmul form), at the default
model's shapes (32 sequences, 4 query heads over 1 KV head, head_dim 256, bf16). Replaces its section of
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/decode_attention.py
"""

from __future__ import annotations

import datetime
import statistics
import time

import torch
import torch.nn.functional as F

from results_file import machine, replace_section

from loraserve import kernels
from loraserve.layers.attention import DECODE_MATMUL_MAX_KEYS, Attention

HEADING = "## Decode attention: the compiled op against SDPA and two matmuls, default model shapes"
SEQUENCES, HEADS, KV_HEADS, HEAD_DIM, SCALE = 32, 4, 1, 256, 256**-0.5


def per_call_us(fn, repeats: int = 5, calls: int = 50) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    layer = Attention(HEADS, KV_HEADS, HEAD_DIM, SCALE)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for keys_len in (16, 64, 128, 256, 512):
        shape = (SEQUENCES, HEADS, 1, HEAD_DIM)
        query = torch.randn(shape, generator=generator).bfloat16()
        keys = torch.randn(SEQUENCES, KV_HEADS, keys_len, HEAD_DIM, generator=generator).bfloat16()
        values = torch.randn(SEQUENCES, KV_HEADS, keys_len, HEAD_DIM, generator=generator).bfloat16()
        mask = torch.ones(SEQUENCES, 1, 1, keys_len, dtype=torch.bool)
        mask[::2, ..., keys_len // 2 :] = False  # half the sequences see half the keys, as padding does

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=SCALE, enable_gqa=True)

        def matmuls() -> torch.Tensor:
            return layer._decode(query, keys, values, mask)

        # The same keys as a paged cache: sequence b's keys in slots [b * keys_len, (b + 1) * keys_len); the masked
        # sequences see the first half, as a shorter sequence would.
        k_flat = keys.transpose(1, 2).reshape(-1, KV_HEADS, HEAD_DIM)
        v_flat = values.transpose(1, 2).reshape(-1, KV_HEADS, HEAD_DIM)
        kv_slots = torch.arange(SEQUENCES * keys_len).view(SEQUENCES, keys_len)
        kv_lens = mask[:, 0, 0].sum(-1)
        flat_query = query[:, :, 0].contiguous()
        out = torch.empty_like(flat_query)
        op = kernels.compiled_op("decode_attention_")

        def compiled() -> torch.Tensor:
            op(out, flat_query, k_flat, v_flat, torch.arange(SEQUENCES), kv_slots, kv_lens, kv_lens - 1, SCALE, 0.0, 0)
            return out[:, :, None]

        reference = F.scaled_dot_product_attention(query.float(), keys.float(), values.float(), attn_mask=mask,
                                                   scale=SCALE, enable_gqa=True)
        forms = (sdpa, matmuls, compiled)
        errors = [(fn().float() - reference).abs().max().item() for fn in forms]
        rows.append((keys_len, *[per_call_us(fn) for fn in forms], *errors))
        print(rows[-1], flush=True)
    lines = [
        f"{HEADING} ({datetime.datetime.now().isoformat(timespec='minutes')})",
        "",
        f"- Machine: {machine()}, {torch.get_num_threads()} torch threads.",
        "- Command: `.venv/bin/python benchmarks/decode_attention.py`",
        f"- Workload: one decode step's attention in one layer: {SEQUENCES} sequences, one query each, {HEADS} query "
        f"heads over {KV_HEADS} KV head, head_dim {HEAD_DIM}, bf16; half the sequences masked to half the keys. "
        "Matmuls: `Attention._decode` (query heads of a KV head as rows, fp32 scores and weights), on K and V "
        "already gathered (the layer's gather and casts come on top). Op: `torch.ops.loraserve.decode_attention_` "
        "reading the same keys as a paged cache. Error: max absolute difference from SDPA in fp32.",
        "",
        "| keys per sequence | SDPA us | matmuls us | op us | op speed-up over the faster | SDPA error | matmuls error "
        "| op error |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {k} | {a:.0f} | {b:.0f} | {c:.0f} | {min(a, b) / c:.1f}x | {ea:.4f} | {eb:.4f} | {ec:.4f} |"
          for k, a, b, c, ea, eb, ec in rows],
        "",
        "- The layer runs the op for every decode group on the CPU; where the extension is not built it takes the "
        f"matmul form up to {DECODE_MATMUL_MAX_KEYS} keys and SDPA beyond, and prefill keeps SDPA.",
        "",
    ]
    replace_section(HEADING, lines)


if __name__ == "__main__":
    main()
