"""Multi-LoRA throughput on the default model, in one run: output tokens/s of 32 concurrent requests spread over 1, 8,
32 and 128 distinct rank-16 adapters (all seven projections), and over 32 q/v-only ones, each against a base-model
run just before it (this machine's speed drifts between minutes, so a ratio is taken of neighbours); 1000 adapters in rotation
against one adapter; the cold-load time of one adapter; the time to first token for an uncached adapter against the
base model's.

Adapters are random PEFT checkpoints written here (adapter_config.json + adapter_model.safetensors). The 1000-adapter
rotation uses 1000 adapter folders whose weight files are symlinks to 32 real ones (15 MB each in fp32): every id is
still read, validated and cached on its own, as 1000 real adapters would be, without writing 15 GB. Replaces its
section of benchmarks/RESULTS.md and writes benchmarks/plots/lora_throughput.png.

    .venv/bin/python benchmarks/lora_throughput.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_kernel import read_bandwidth
from results_file import machine, replace_section
from weights import linear_bytes

from loraserve.adapters.registry import AdapterKey
from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.engine import Engine
from loraserve.engine.llm import collect
from loraserve.engine.request import AdapterRef
from loraserve.layers.linear import Linear
from loraserve.sampling.params import SamplingParams

HERE = Path(__file__).parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEADING = "## Multi-LoRA throughput, default model"


def decoder_projections(engine: Engine, targets: list[str] = TARGETS) -> dict[str, tuple[int, int]]:
    """(in, out) of every decoder projection named in `targets`, by module name."""
    return {name: (module.in_features, module.out_features)
            for name, module in engine.core.runner.model.named_modules()
            if isinstance(module, Linear) and name != "lm_head" and name.rsplit(".", 1)[-1] in targets}


def write_adapter(path: Path, projections: dict[str, tuple[int, int]], rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in projections.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.02
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    targets = sorted({name.rsplit(".", 1)[-1] for name in projections})
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}))


def alias_adapter(source: Path, path: Path) -> None:
    path.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (path / name).symlink_to(source / name)


def throughput(engine: Engine, adapters: list[Path | None], requests: int, new_tokens: int) -> float:
    """Output tokens/s for `requests` requests added at once (the engine runs up to max_running of them at a time),
    request i using adapters[i % len(adapters)]."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, chosen_logprob=False)
    made = [
        engine.make_request(f"Write a short paragraph about topic number {i}.", params,
                            adapter=AdapterRef(str(path), "local") if (path := adapters[i % len(adapters)]) else None)
        for i in range(requests)
    ]
    start = time.perf_counter()
    for request in made:
        engine.add(request)
    while engine.has_work():
        engine.step()
    return requests * new_tokens / (time.perf_counter() - start)


def rotation_throughput(engine: Engine, adapters: list[Path], new_tokens: int) -> float:
    """Output tokens/s through the server's path: `AsyncEngine`'s step loop on this (main) thread as in
    `loraserve serve`, the requests sent from an asyncio loop in another thread, all at once; each adapter is read in
    a worker thread while the step loop keeps decoding the requests already admitted."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, chosen_logprob=False)
    front = AsyncEngine(engine)
    result: dict[str, float] = {}

    async def send_all() -> None:
        start = time.perf_counter()
        await asyncio.gather(*(collect(front.generate(f"Write a short paragraph about topic number {i}.", params,
                                                      adapter=AdapterRef(str(path), "local")))
                               for i, path in enumerate(adapters)))
        result["tok/s"] = len(adapters) * new_tokens / (time.perf_counter() - start)

    def client() -> None:
        while not front.is_running:
            time.sleep(0.001)
        try:
            asyncio.run(send_all())
        finally:
            front.shutdown()

    sender = threading.Thread(target=client, name="bench-client")
    sender.start()
    front.run()
    sender.join()
    return result["tok/s"]


def time_to_first_token(engine: Engine, adapter: Path | None) -> float:
    """Seconds from adding one request (adapter load included) to its first token, on an idle engine."""
    params = SamplingParams(max_new_tokens=1, ignore_eos=True, chosen_logprob=False)
    request = engine.make_request("Write a short paragraph about a cold start.", params,
                                  adapter=AdapterRef(str(adapter), "local") if adapter else None)
    start = time.perf_counter()
    engine.add(request)
    while engine.has_work():
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rotation", type=int, default=1000, help="adapter ids in the rotation run")
    parser.add_argument("--rotation-requests", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=3, help="base / adapter run pairs per row; medians reported")
    args = parser.parse_args()
    engine = Engine.from_config(EngineConfig(dtype="bfloat16", max_active_adapters=args.concurrency,
                                             max_running_requests=args.concurrency))
    projections = decoder_projections(engine)
    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    real = max(max(args.adapters), 32)
    fleet = [root / f"adapter-{i}" for i in range(real)]
    for i, path in enumerate(fleet):
        write_adapter(path, projections, 16, seed=i)
    rotation = [root / f"rotation-{i:04d}" for i in range(args.rotation)]
    for i, path in enumerate(rotation):
        alias_adapter(fleet[i % 32], path)
    extra_cold = [root / f"cold-{i}" for i in range(6)]
    for i, path in enumerate(extra_cold):
        write_adapter(path, projections, 16, seed=10_000 + i)

    qv_projections = decoder_projections(engine, ["q_proj", "v_proj"])
    qv_fleet = [root / f"qv-{i}" for i in range(args.concurrency)]
    for i, path in enumerate(qv_fleet):
        write_adapter(path, qv_projections, 16, seed=i)

    throughput(engine, [None], 4, 4)  # warm-up
    runs = [(f"{count} distinct adapters", fleet[:count]) for count in args.adapters]
    runs.append((f"{args.concurrency} distinct adapters, q/v only", qv_fleet))
    rows, bases = [], []
    for name, adapters in runs:
        requests = max(args.concurrency, len(adapters))
        throughput(engine, adapters, requests, 2)  # read each into host memory once
        pairs = [(throughput(engine, [None], requests, args.new_tokens),
                  throughput(engine, adapters, requests, args.new_tokens)) for _ in range(args.pairs)]
        ratio = statistics.median(with_adapters / base for base, with_adapters in pairs)
        paired = statistics.median(base for base, _ in pairs)
        bases.append(paired)
        rows.append((name, statistics.median(value for _, value in pairs), paired, ratio, len(adapters)))
        print(rows[-1], pairs, flush=True)
    one_adapter = rows[0][1] if args.adapters[0] == 1 else throughput(engine, fleet[:1], args.concurrency,
                                                                     args.new_tokens)
    picks = random.Random(0).sample(rotation, min(args.rotation_requests, len(rotation)))
    rotating = rotation_throughput(engine, picks, args.new_tokens)  # every request: an adapter never seen
    print(("rotation", rotating), flush=True)

    cold_load_ms = []
    for path in extra_cold[:3]:
        start = time.perf_counter()
        engine.adapters.host.get(AdapterKey("local", str(path)), None)
        cold_load_ms.append((time.perf_counter() - start) * 1e3)
    base_ttft = statistics.median(time_to_first_token(engine, None) for _ in range(5)) * 1e3
    cold_ttft = statistics.median(time_to_first_token(engine, path) for path in extra_cold[3:]) * 1e3
    print(("ttft base / cold", base_ttft, cold_ttft), flush=True)
    adapter_bytes = {fleet[0]: engine.adapters.host.get(AdapterKey("local", str(fleet[0])), None).nbytes,
                     qv_fleet[0]: engine.adapters.host.get(AdapterKey("local", str(qv_fleet[0])), None).nbytes}
    bound = AdapterBound(read_bandwidth(256 << 20), sum(linear_bytes(engine).values()))
    rows_out = [(name, value, base, ratio, bound.ceiling(value_base_step(base, args), min(count, args.concurrency),
                                                         adapter_bytes[qv_fleet[0] if "q/v" in name else fleet[0]]))
                for name, value, base, ratio, count in rows]
    write_results(args, rows_out, statistics.median(bases), one_adapter, rotating, statistics.median(cold_load_ms),
                  base_ttft, cold_ttft, bound, adapter_bytes[fleet[0]])


def value_base_step(base_tok_s: float, args: argparse.Namespace) -> float:
    """Seconds per step of the base-model run: its batch's tokens over its tokens/s."""
    return args.concurrency / base_tok_s


@dataclass(frozen=True)
class AdapterBound:
    """The best a step can do with adapters, given what it measurably is: the base model's step (bound by compute and
    overhead, far below this machine's read bandwidth) plus reading each distinct adapter once at that bandwidth."""

    read_gb_s: float  # a plain streaming read on this machine
    base_bytes: int  # the base weights a step reads, for the ratio of bandwidths quoted beside the table

    def ceiling(self, base_step_s: float, distinct: int, adapter_bytes: int) -> float:
        return base_step_s / (base_step_s + distinct * adapter_bytes / (self.read_gb_s * 1e9))


def write_results(args: argparse.Namespace, rows: list[tuple[str, float, float, float, float]], base: float,
                  one_adapter: float, rotating: float, cold_load_ms: float, base_ttft: float, cold_ttft: float,
                  bound: AdapterBound, adapter_bytes: int) -> None:
    mb = 1 << 20
    base_step = value_base_step(base, args)
    lines = [
        f"{HEADING} ({datetime.datetime.now().isoformat(timespec='minutes')})",
        "",
        f"- Machine: {machine()}, {torch.get_num_threads()} torch threads.",
        "- Command: `.venv/bin/python benchmarks/lora_throughput.py`",
        f"- Workload: up to {args.concurrency} requests running at once, {args.new_tokens} new tokens each (EOS "
        "ignored), greedy, bf16, prompts of about 12 tokens (their prefill is included); rank-16 adapters on all "
        f"seven projections of all 18 layers (or on q/v only), round-robin over the requests; at most "
        f"{args.concurrency} adapters on the device. Each adapter run is paired with a base-model run of the same "
        f"requests just before it; {args.pairs} pairs per row, medians of tok/s and of the pairs' ratios.",
        "",
        "| run | tok/s | base tok/s (paired) | ratio to base | bound |",
        "|---|---|---|---|---|",
        *[f"| {name} | {value:.1f} | {paired:.1f} | **{ratio:.2f}** | {ceiling:.2f} |"
          for name, value, paired, ratio, ceiling in rows],
        "",
        f"- Bound: the base model's step as measured (median {base_step * 1e3:.0f} ms for {args.concurrency} rows; "
        f"it reads {bound.base_bytes / mb:.0f} MB of weights in that time, "
        f"{bound.base_bytes / base_step / 1e9:.1f} GB/s, against {bound.read_gb_s:.1f} GB/s that a plain streaming "
        "read gets here, so it is bound by compute and overhead, not by bytes) plus each distinct adapter read once "
        f"at {bound.read_gb_s:.1f} GB/s ({adapter_bytes / mb:.1f} MB for rank 16 on seven projections in bf16): "
        "base step / (base step + distinct x adapter bytes / bandwidth).",
        f"- Rotation: {args.rotation_requests} requests arriving at once over {args.rotation} adapter ids, through "
        "`AsyncEngine` with its step loop on the main thread (the server's path), each request's adapter cold "
        f"(read from disk in a worker thread, validated, copied into a slot): {rotating:.1f} tok/s = "
        f"**{rotating / one_adapter:.2f}x** the one-adapter throughput ({one_adapter:.1f} tok/s).",
        f"- Cold load of one adapter from local disk into host memory: {cold_load_ms:.1f} ms (median of 3).",
        f"- Time to first token, one request on an idle engine: base model {base_ttft:.1f} ms; a never-seen adapter "
        f"{cold_ttft:.1f} ms, that is base + {cold_ttft - base_ttft:.1f} ms (aim: base + 50 ms).",
        "",
        "![throughput against adapters](plots/lora_throughput.png)",
        "",
    ]
    replace_section(HEADING, lines)
    plot(rows)


def plot(rows: list[tuple[str, float, float, float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name.replace(" distinct adapters", "").replace(", q/v only", "\nq/v only") for name, *_ in rows]
    figure, axis = plt.subplots(figsize=(6.5, 3.5))
    axis.bar(names, [ratio for _, _, _, ratio, _ in rows], color="#3b7dd8", label="measured")
    axis.scatter(names, [ceiling for *_, ceiling in rows], color="#333", marker="_", s=400, label="bound")
    axis.axhline(0.9, color="#c33", linestyle="--", label="aim: 0.90 (q/v: 0.95)")
    axis.set_ylim(0, 1.05)
    axis.set_xlabel("distinct adapters among the requests")
    axis.set_ylabel("tok/s over the paired base run")
    axis.set_title("Gemma 3 270M, bf16, 2 CPU cores")
    axis.legend()
    figure.tight_layout()
    (HERE / "plots").mkdir(exist_ok=True)
    figure.savefig(HERE / "plots" / "lora_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
