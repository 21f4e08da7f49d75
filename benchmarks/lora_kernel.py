"""The batched-LoRA delta of one decode step on the CPU: the fused op against the torch forms it replaces.

Gemma 3 270M shapes (hidden 640; q 640->1024, k/v 640->256, o 1024->640, gate/up 640->2048, down 2048->640; 18
layers): every projection of every layer has its own arena, so a step streams each adapter's A and B once per
projection, as serving does. One step = 126 calls (7 projections x 18 layers). Forms timed, bf16:

- fused: `lora_kernel.add_lora_`, one compiled call per projection;
- segmented: one bf16 matmul pair per segment plus an `index_put_` (as `lora_ops.segmented_add_`);
- reference: `lora_kernel.reference_add_lora_`, the same loop in fp32 (the oracle);
- dense: `shrunk = (x @ a[:W].T) * mask; y += shrunk @ b[:W]` over all W = adapters x rank arena rows.

GB/s is the adapter bytes a step must read (each used adapter's A and B, every projection) over the step's time,
for every form alike. Timings are the median (and min) of 3 repeats; on a 2-core machine they are noisy. A full run
(not --quick) replaces its section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/lora_kernel.py [--rank 16] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from results_file import machine, replace_section

from loraserve.layers import lora_kernel

HEADING = "## The fused LoRA op against the torch forms, one decode step's deltas"

HIDDEN, LAYERS = 640, 18
PROJECTIONS = {"q": (640, 1024), "k": (640, 256), "v": (640, 256), "o": (1024, 640), "gate": (640, 2048),
               "up": (640, 2048), "down": (2048, 640)}


def build(adapters: int, per_adapter: int, rank: int, dtype: torch.dtype):
    """Per layer and projection: arena (a, b), inputs and outputs; plus the shared batch description."""
    tokens = adapters * per_adapter
    width = adapters * rank
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        for inn, out in PROJECTIONS.values():
            a = (torch.randn(width, inn, generator=g) * 0.02).to(dtype)
            b = (torch.randn(width, out, generator=g) * 0.02).to(dtype)
            x = torch.randn(tokens, inn, generator=g).to(dtype)
            y = torch.zeros(tokens, out, dtype=dtype)
            layers.append((y, x, a, b))
    # tokens interleaved across adapters (token i uses adapter i % adapters), grouped by adapter in `rows`
    slots = torch.arange(tokens) % adapters
    rows = torch.argsort(slots, stable=True)
    seg_starts = torch.arange(adapters + 1, dtype=torch.int64) * per_adapter
    seg_offsets = torch.arange(adapters, dtype=torch.int64) * rank
    seg_ranks = torch.full((adapters,), rank, dtype=torch.int64)
    mask = (slots[:, None] == (torch.arange(width) // rank)[None, :]).to(dtype)
    batch = (rows, seg_starts, seg_offsets, seg_ranks)
    adapter_bytes = sum(adapters * rank * (inn + out) for inn, out in PROJECTIONS.values()) * LAYERS
    adapter_bytes *= torch.finfo(dtype).bits // 8
    return layers, batch, mask, adapter_bytes


def step_fused(layers, batch, mask):
    for y, x, a, b in layers:
        lora_kernel.add_lora_(y, x, a, b, *batch)


def step_reference(layers, batch, mask):
    for y, x, a, b in layers:
        lora_kernel.reference_add_lora_(y, x, a, b, *batch)


def step_segmented(layers, batch, mask):
    rows, seg_starts, seg_offsets, seg_ranks = batch
    starts, offsets, ranks = seg_starts.tolist(), seg_offsets.tolist(), seg_ranks.tolist()
    segments = [(rows[starts[s] : starts[s + 1]], offsets[s], ranks[s]) for s in range(len(offsets))]
    for y, x, a, b in layers:
        for idx, off, r in segments:
            delta = (x[idx] @ a[off : off + r].T) @ b[off : off + r]
            y.index_put_((idx,), delta, accumulate=True)


def step_dense(layers, batch, mask):
    width = mask.shape[1]
    for y, x, a, b in layers:
        shrunk = (x @ a[:width].T) * mask
        y.add_(shrunk @ b[:width])


FORMS = {"fused": step_fused, "segmented": step_segmented, "dense": step_dense, "reference": step_reference}


def timed(fn, *args, budget_s: float) -> tuple[float, float]:
    """(median, min) seconds per call over 3 repeats, each of as many calls as fit in about budget_s / 3."""
    fn(*args)  # warm up
    t0 = time.perf_counter()
    fn(*args)
    once = time.perf_counter() - t0
    n = max(1, int(budget_s / 3 / max(once, 1e-6)))
    repeats = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        repeats.append((time.perf_counter() - t0) / n)
    return statistics.median(repeats), min(repeats)


def read_bandwidth(nbytes: int) -> float:
    """GB/s of a plain streaming read of nbytes (fp32 sum), for scale."""
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / timed(torch.sum, t, budget_s=1.0)[0] / 1e9


def call_overhead() -> tuple[float, float]:
    """Microseconds of one tiny call: through add_lora_, and of the compiled op directly."""
    y, x = torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(1, 16, dtype=torch.bfloat16)
    a, b = torch.zeros(1, 16, dtype=torch.bfloat16), torch.zeros(1, 16, dtype=torch.bfloat16)
    batch = (torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1]), torch.zeros(1, dtype=torch.int64),
             torch.ones(1, dtype=torch.int64))
    op = lora_kernel._op

    def wrapped(n=1000):
        for _ in range(n):
            lora_kernel.add_lora_(y, x, a, b, *batch)

    def direct(n=1000):
        for _ in range(n):
            op(y, x, a, b, *batch)

    return timed(wrapped, budget_s=0.5)[0] * 1e3, timed(direct, budget_s=0.5)[0] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per form and case")
    parser.add_argument("--quick", action="store_true", help="only 32 adapters x 1 token")
    parser.add_argument("--cases", default="32x1,32x8,8x8,4x8,1x32", help="ADAPTERSxTOKENS_PER_ADAPTER,...")
    parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated subset of " + ",".join(FORMS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16

    t0 = time.perf_counter()
    available = lora_kernel.fused_lora_available("cpu")
    load_s = time.perf_counter() - t0
    print(f"fused op: {lora_kernel.fused_lora_info()} (load {load_s:.1f} s), threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    if available:
        wrapped_us, direct_us = call_overhead()
        print(f"per-call overhead (tiny call): add_lora_ {wrapped_us:.2f} us, compiled op directly {direct_us:.2f} us")

    cases = [(32, 1)] if args.quick else [tuple(map(int, c.split("x"))) for c in args.cases.split(",")]
    rows_out = []
    for adapters, per in cases:
        layers, batch, mask, nbytes = build(adapters, per, args.rank, dtype)
        # correctness, once: fused against the fp32 reference on one projection
        y, x, a, b = layers[6]
        want = lora_kernel.reference_add_lora_(y.clone(), x, a, b, *batch).float()
        got = lora_kernel.add_lora_(y.clone(), x, a, b, *batch).float()
        err = ((got - want).abs() / want.abs().clamp_min(1e-3)).max().item()
        for name, fn in FORMS.items():
            if name not in args.forms.split(",") or (name == "fused" and not available):
                continue
            budget = args.budget if name != "reference" else min(args.budget, 1.0)
            sec, best = timed(fn, layers, batch, mask, budget_s=budget)
            rows_out.append((adapters, per, name, sec * 1e3, best * 1e3, nbytes / sec / 1e9,
                             err if name == "fused" else None))
    bandwidth = read_bandwidth(256 << 20)
    print(f"stream-read baseline: {bandwidth:.1f} GB/s (fp32 sum over 256 MiB)")
    print()
    print(f"rank {args.rank}, bf16, {LAYERS} layers x {len(PROJECTIONS)} projections = "
          f"{LAYERS * len(PROJECTIONS)} calls per step; median of 3, noisy")
    print(f"{'adapters':>8} {'tok/adpt':>8} {'tokens':>6} {'form':<10} {'ms/step':>9} {'(min)':>9} {'GB/s':>7}"
          "  max rel err")
    for adapters, per, name, ms, best, gbs, err in rows_out:
        extra = f"  {err:.1e}" if err is not None else ""
        print(f"{adapters:>8} {per:>8} {adapters * per:>6} {name:<10} {ms:>9.2f} {best:>9.2f} {gbs:>7.1f}{extra}")
    if not args.quick:
        write_results(args, rows_out, bandwidth, lora_kernel.fused_lora_info())



def write_results(args: argparse.Namespace, rows_out: list, bandwidth: float, isa: str) -> None:
    forms = [name for name in FORMS if any(row[2] == name for row in rows_out)]
    lines = [
        f"{HEADING} ({datetime.datetime.now().isoformat(timespec='minutes')})",
        "",
        f"- Machine: {machine()}, {args.threads} torch threads; fused op compiled for `{isa}`.",
        "- Command: `.venv/bin/python benchmarks/lora_kernel.py`",
        f"- Workload: rank-{args.rank} adapters on all seven projections of Gemma 3 270M's {LAYERS} layers, bf16: one "
        f"decode step's deltas = {LAYERS * len(PROJECTIONS)} calls, each adapter's A and B in every projection read "
        "once. GB/s = those adapter bytes over the step's time (the same bytes for every form); a plain streaming "
        f"read on this machine runs at {bandwidth:.1f} GB/s. Median of 3 repeats.",
        "",
        "| adapters x tokens each | " + " | ".join(f"{name} ms (GB/s)" for name in forms) + " | fused max rel err |",
        "|---|" + "---|" * (len(forms) + 1),
    ]
    for adapters, per in dict.fromkeys((row[0], row[1]) for row in rows_out):
        cells = {row[2]: row for row in rows_out if row[:2] == (adapters, per)}
        err = cells["fused"][6] if "fused" in cells else None
        timings = " | ".join(f"{cells[name][3]:.2f} ({cells[name][5]:.1f})" if name in cells else "-"
                             for name in forms)
        lines.append(f"| {adapters} x {per} | {timings} | {f'{err:.1e}' if err is not None else '-'} |")
    lines.append("")
    replace_section(HEADING, lines)


if __name__ == "__main__":
    main()
