"""One stream at memory speed (issue 14): ms per decode token of the default model in bf16 against the floor that its
weight bytes set at this machine's measured read bandwidth, and where the step's time goes.

The floor is the bytes every decode token must read (the linears as stored for their matmuls, the tied head once)
over a plain streaming read of a buffer larger than any cache, measured in the same run. The parts come from a torch
profile of the timed steps: self time per op, grouped; what the profile does not see (Python, dispatch) is the step
time less the ops' time. Writes its section of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/single_stream.py [--steps 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch

from results_file import machine, replace_section
from step_profile import fill
from weights import linear_bytes

from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine
from loraserve.layers.linear import Linear

HEADING = "## One stream against the memory floor, default model"

# Profile op names -> the part of the step they belong to (the rest is "other ops").
PARTS = {
    "mkldnn::_linear_pointwise": "decoder linears (oneDNN)",
    "loraserve::bf16_linear_fp32_": "lm_head (GEMV)",
    "loraserve::bf16_linear": "decoder linears (GEMV)",
    "loraserve::bf16_linear_parts": "decoder linears (GEMV)",
    "loraserve::rms_norm": "norms",
    "loraserve::rotary": "rotary",
    "loraserve::decode_attention_": "attention",
}


def held_linear_bytes(engine: Engine) -> int:
    """Bytes the linears hold in every layout they keep (a plain copy for the GEMV beside oneDNN's packed one, the
    tied table once): the memory the single-stream path costs, against the bytes one step reads."""
    storages: dict[int, int] = {}
    for module in engine.core.runner.model.modules():
        if isinstance(module, Linear):
            if module.weight is not None:  # tied: one storage, however many modules hold it
                storages[module.weight.untyped_storage().data_ptr()] = module.weight.nbytes
            if module.packed_weight is not None:  # oneDNN's opaque tensor, one per layer
                storages[id(module.packed_weight)] = module.packed_weight.nbytes
    return sum(storages.values())


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """GB/s of a streaming read (fp32 sum) of `nbytes`, best of 5."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    buffer.sum()
    best = min(_seconds(buffer.sum) for _ in range(5))
    return nbytes / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_config(EngineConfig(dtype="bfloat16", max_running_requests=1))
    fill(engine, [None], 1, 8)
    while engine.has_work():
        engine.step()
    weight_bytes = sum(linear_bytes(engine).values())
    held_bytes = held_linear_bytes(engine)
    bandwidth = read_bandwidth()

    fill(engine, [None], 1, 2 * args.steps + 8)
    times = [_seconds(engine.step) * 1e3 for _ in range(args.steps)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            engine.step()
    while engine.has_work():
        engine.step()
    step_ms = statistics.median(times)
    floor_ms = weight_bytes / bandwidth / 1e6

    parts: dict[str, float] = {}
    calls: dict[str, int] = {}
    for event in prof.key_averages():
        part = PARTS.get(event.key, "other ops")
        parts[part] = parts.get(part, 0.0) + event.self_cpu_time_total / 1e3 / args.steps
        calls[part] = calls.get(part, 0) + event.count // args.steps
    profiled = sum(parts.values())

    stamp = datetime.datetime.now().isoformat(timespec="minutes")
    lines = [
        f"{HEADING} ({stamp})",
        "",
        f"- Machine: {machine()}, {args.threads} torch threads.",
        f"- Command: `.venv/bin/python benchmarks/single_stream.py --steps {args.steps} --threads {args.threads}`",
        "- Workload: one request decoding alone, greedy, bf16, the engine without HTTP; median of "
        f"{args.steps} decode steps (about 40-170 tokens of context).",
        f"- Floor: {weight_bytes / 1e6:.0f} MB of linear weights as stored for their matmuls (the tied 262k x 640 "
        f"head counted once) over a streaming read of 1 GiB at {bandwidth:.1f} GB/s = {floor_ms:.1f} ms.",
        f"- Held: the linears keep {held_bytes / 1e6:.0f} MB in all " + (
            "(a plain copy of each decoder projection for the GEMV beside oneDNN's packed one for batches; the tied "
            "table, plain, beside the head's packed copy)." if held_bytes > weight_bytes else
            "(nothing packed for oneDNN: the plain weights alone, which the GEMV streams)."),
        "",
        "| ms per token | floor ms | x floor | aim |",
        "|---|---|---|---|",
        f"| {step_ms:.1f} | {floor_ms:.1f} | **{step_ms / floor_ms:.2f}** | <= 1.5 |",
        "",
        "Where a step's time goes (torch profile of the profiled steps, self time per step; the profile itself "
        "slows small ops, so the parts can sum past the timed step):",
        "",
        "| part | ms per step | ops per step |",
        "|---|---|---|",
    ]
    for part, ms in sorted(parts.items(), key=lambda item: -item[1]):
        lines.append(f"| {part} | {ms:.1f} | {calls[part]} |")
    lines.append(f"| Python and dispatch (timed step less profiled ops) | {max(step_ms - profiled, 0.0):.1f} | - |")
    print("\n".join(lines))
    replace_section(HEADING, lines)


if __name__ == "__main__":
    main()
