"""Where one decode step's time goes, on the default model: `torch.profiler` over decode steps of a full batch, the
base model against the same batch over distinct adapters, ops grouped by self CPU time. A tool for finding the next
thing to make faster; it writes nothing to RESULTS.md.

    .venv/bin/python benchmarks/step_profile.py                       # 32 requests: base, then 32 adapters
    .venv/bin/python benchmarks/step_profile.py --adapters 32 --targets q_proj v_proj --rank 16
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 .venv/bin/python benchmarks/step_profile.py   # oneDNN without AMX

`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` keeps oneDNN off AMX on a Xeon that has it: the closest this machine gets to
an AVX-512 BF16 CPU without AMX (a Zen 4), as far as the matmuls go.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lora_throughput import TARGETS, decoder_projections, write_adapter

from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine
from loraserve.engine.request import AdapterRef
from loraserve.sampling.params import SamplingParams


def fill(engine: Engine, adapters: list[Path | None], requests: int, new_tokens: int) -> None:
    """`requests` requests, request i on adapters[i % len(adapters)], stepped until every one is decoding."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, chosen_logprob=False)
    for i in range(requests):
        path = adapters[i % len(adapters)]
        engine.add(engine.make_request(f"Write a short paragraph about topic number {i}.", params,
                                       adapter=AdapterRef(str(path), "local") if path else None))
    scheduler = engine.core.scheduler
    while scheduler.waiting or any(not request.output_token_ids for request in scheduler.running):
        engine.step()


def profile(engine: Engine, adapters: list[Path | None], args: argparse.Namespace, label: str) -> float:
    """Median ms of the timed decode steps; prints the profile of the steps after them."""
    fill(engine, adapters, args.concurrency, args.timed + args.profiled + 8)
    times = []
    for _ in range(args.timed):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.profiled):
            engine.step()
    while engine.has_work():
        engine.step()
    step = statistics.median(times)
    print(f"\n=== {label}: {step:.1f} ms per decode step (median of {args.timed}), "
          f"profile of {args.profiled} steps, per step:")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(table)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters of the adapter run (0: base only)")
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--timed", type=int, default=10)
    parser.add_argument("--profiled", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    engine = Engine.from_config(EngineConfig(dtype="bfloat16", max_running_requests=args.concurrency))
    fill(engine, [None], 4, 4)
    while engine.has_work():
        engine.step()
    base = profile(engine, [None], args, "base model")
    if args.adapters:
        root = Path(tempfile.mkdtemp(prefix="step-profile-"))
        projections = decoder_projections(engine, args.targets)
        fleet: list[Path | None] = [root / f"adapter-{i}" for i in range(args.adapters)]
        for i, path in enumerate(fleet):
            write_adapter(path, projections, args.rank, seed=i)
        loaded = profile(engine, fleet, args, f"{args.adapters} distinct adapters, rank {args.rank}, "
                                              f"{' '.join(args.targets)}")
        print(f"\nadapters / base throughput: {base / loaded:.3f} ({loaded - base:.1f} ms of LoRA work per step)")


if __name__ == "__main__":
    main()
