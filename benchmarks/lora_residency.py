"""What adapters cost in proportion to what they hold, on the default model: the LoRA work of a decode step at 32
concurrent requests over 32 distinct q/v-only adapters against 32 all-seven adapters (rank 16), and the device memory
of 32 resident adapters of rank 16 and of rank 64 against the weights they hold. Replaces its section of
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/lora_residency.py
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
from pathlib import Path

import torch

from lora_throughput import decoder_projections, throughput, write_adapter
from results_file import machine, replace_section

from loraserve.adapters.registry import AdapterKey
from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine

HEADING = "## Adapter cost in proportion to what adapters hold, default model"
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]


def step_ms(engine: Engine, adapters: list[Path | None], requests: int, new_tokens: int, repeats: int) -> float:
    """Median over `repeats` runs of the mean time per generated token of the whole batch, in ms per step."""
    runs = [requests / throughput(engine, adapters, requests, new_tokens) * 1e3 for _ in range(repeats)]
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = Engine.from_config(EngineConfig(dtype="bfloat16", max_running_requests=args.concurrency))
    root = Path(tempfile.mkdtemp(prefix="lora-residency-"))
    fleets: dict[str, list[Path]] = {}
    for label, targets, rank in (("q/v only, r16", QV, 16), ("all seven, r16", ALL_SEVEN, 16),
                                 ("all seven, r64", ALL_SEVEN, 64)):
        projections = decoder_projections(engine, targets)
        fleets[label] = [root / f"{label.replace('/', '').replace(', ', '-')}-{i}" for i in range(args.concurrency)]
        for i, path in enumerate(fleets[label]):
            write_adapter(path, projections, rank, seed=i)

    held = {label: sum(engine.adapters.host.get(AdapterKey("local", str(p)), None).nbytes for p in fleet)
            for label, fleet in fleets.items()}
    throughput(engine, [None], 4, 4)  # warm-up
    base = step_ms(engine, [None], args.concurrency, args.new_tokens, args.repeats)
    timing, memory = {}, {}
    for label, fleet in fleets.items():
        throughput(engine, fleet, args.concurrency, 2)  # onto the device once
        memory[label] = (engine.adapters.device_bytes, engine.adapters.layer_bytes)
        timing[label] = step_ms(engine, fleet, args.concurrency, args.new_tokens, args.repeats)
        for path in fleet:  # leave the device to the next fleet
            engine.adapters.unload(AdapterKey("local", str(path)))
        print(label, timing[label], memory[label], held[label], flush=True)
    write_results(args, base, timing, memory, held)


def write_results(args: argparse.Namespace, base: float, timing: dict[str, float],
                  memory: dict[str, tuple[int, int]], held: dict[str, int]) -> None:
    mb = 1 << 20
    qv, seven = timing["q/v only, r16"] - base, timing["all seven, r16"] - base
    lines = [
        f"{HEADING} ({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {machine()}, {torch.get_num_threads()} torch threads.",
        "- Command: `.venv/bin/python benchmarks/lora_residency.py`",
        f"- Workload: {args.concurrency} requests at once, each on its own adapter, {args.new_tokens} new tokens "
        f"(EOS ignored), greedy, bf16, default LoRA flags; ms per decode step of the whole batch, median of "
        f"{args.repeats} runs. LoRA work = step time with adapters minus the base model's step "
        f"({base:.1f} ms).",
        "",
        "| 32 distinct adapters | step ms | LoRA work ms | adapter weights held | device bytes (weights) | "
        "LoRA layers' bytes (arena capacity) |",
        "|---|---|---|---|---|---|",
        *[f"| {label} | {timing[label]:.1f} | {timing[label] - base:.1f} | {held[label] / mb:.1f} MB | "
          f"{memory[label][0] / mb:.1f} MB | {memory[label][1] / mb:.1f} MB |" for label in timing],
        "",
        f"- q/v-only adapters hold {held['q/v only, r16'] / held['all seven, r16']:.2f} of the all-seven adapters' "
        f"bytes; their LoRA work is {qv / seven:.2f} of theirs ({qv:.1f} against {seven:.1f} ms per step).",
        f"- Device memory follows what is resident: rank 64 takes {memory['all seven, r64'][0] / memory['all seven, r16'][0]:.2f}x"
        " the bytes of rank 16, and the LoRA layers hold "
        f"{memory['all seven, r64'][1] / held['all seven, r64']:.2f}x (r64) and "
        f"{memory['all seven, r16'][1] / held['all seven, r16']:.2f}x (r16) the adapters' own bytes (the excess is "
        "free arena rows kept for growth).",
        "",
    ]
    replace_section(HEADING, lines)


if __name__ == "__main__":
    main()
