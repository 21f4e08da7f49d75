"""Multi-LoRA throughput on the default model: 32 concurrent requests spread over 1, 8 or 32 distinct rank-16 adapters
(all seven projections), against the base model alone, in one run; plus the cold-load time of one adapter.

Adapters are random PEFT checkpoints written here (adapter_config.json + adapter_model.safetensors). Appends a dated
section to benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/lora_throughput.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine
from loraserve.engine.request import AdapterRef
from loraserve.sampling.params import SamplingParams

HERE = Path(__file__).parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(path: Path, projections: dict[str, tuple[int, int]], rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in projections.items():
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.02
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS}))


def throughput(engine: Engine, adapters: list[Path | None], concurrency: int, new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, chosen_logprob=False)
    requests = [
        engine.make_request(f"Write a short paragraph about topic number {i}.", params,
                            adapter=AdapterRef(str(adapters[i % len(adapters)]), "local")
                            if adapters[i % len(adapters)] else None)
        for i in range(concurrency)
    ]
    start = time.perf_counter()
    for request in requests:
        engine.add(request)
    while engine.has_work():
        engine.step()
    return concurrency * new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    engine = Engine.from_config(EngineConfig(dtype="bfloat16", max_active_adapters=max(args.adapters),
                                             max_running_requests=args.concurrency))
    projections = {name: (layer.in_features, layer.out_features) for name, layer in engine.lora.layers.items()}
    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    fleet = [root / f"adapter-{i}" for i in range(max(args.adapters) + 1)]
    for i, path in enumerate(fleet):
        write_adapter(path, projections, 16, seed=i)
    start = time.perf_counter()
    engine.lora.host.get(str(fleet[-1]), "local", None)  # cold: read from disk into host memory
    cold_ms = (time.perf_counter() - start) * 1e3

    throughput(engine, [None], 4, 4)  # warm-up
    base = throughput(engine, [None], args.concurrency, args.new_tokens)
    rows = [("base model", base)]
    for count in args.adapters:
        throughput(engine, fleet[:count], count, 2)  # load them into host memory and slots once
        rows.append((f"{count} distinct adapters", throughput(engine, fleet[:count], args.concurrency,
                                                              args.new_tokens)))
        print(rows[-1], flush=True)
    lines = [
        f"## Multi-LoRA throughput, default model ({datetime.date.today().isoformat()})",
        "",
        f"- Command: `.venv/bin/python benchmarks/lora_throughput.py --new-tokens {args.new_tokens}`",
        f"- Workload: {args.concurrency} concurrent requests, {args.new_tokens} new tokens each (EOS ignored), greedy,"
        " bf16; rank-16 adapters on all seven projections of all 18 layers, spread round-robin over the requests.",
        "",
        "| batch | tok/s | ratio to base |",
        "|---|---|---|",
        *[f"| {name} | {value:.1f} | {value / base:.2f} |" for name, value in rows],
        "",
        f"Cold load of one rank-16 adapter from local disk into host memory: {cold_ms:.1f} ms.",
        "",
    ]
    results = HERE / "RESULTS.md"
    results.write_text(results.read_text().rstrip() + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
