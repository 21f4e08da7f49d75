"""Engine throughput on the default model: loraserve against transformers, same machine, same run.

Measures output tokens/s and time per output token (TPOT) at 1, 8 and 32 concurrent requests, each generating a
fixed number of tokens (EOS ignored, so every system does the same work), and single-stream decode against the
memory floor (bytes of weights read per token / measured memory bandwidth). Replaces its dated section of
benchmarks/RESULTS.md and writes a plot to benchmarks/plots/engine_throughput.png.

    .venv/bin/pip install -e ".[bench]" && .venv/bin/python benchmarks/engine_throughput.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from results_file import machine, replace_section
from weights import linear_bytes

from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine
from loraserve.layers.embedding import VocabEmbedding
from loraserve.layers.linear import Linear
from loraserve.models.default_model import default_model_path
from loraserve.sampling.params import SamplingParams

HERE = Path(__file__).parent
HEADING = "## Engine throughput, default model"
TOPICS = [
    "the history of the printing press", "how vaccines train the immune system", "why the sky is blue",
    "the rules of chess", "how a compiler works", "the water cycle", "the life of honeybees", "black holes",
    "the French revolution", "how to bake bread", "plate tectonics", "the invention of the telephone",
    "photosynthesis", "the Roman empire", "how airplanes fly", "machine learning", "the Great Wall of China",
    "volcanoes", "the human heart", "coral reefs", "the stock market", "electric cars", "the moon landing",
    "ancient Egypt", "climate change", "the internet", "jazz music", "the Olympic games", "DNA", "rainforests",
    "the printing of money", "glaciers",
]
PROMPTS = [f"Write a short paragraph about {topic}." for topic in TOPICS]


@dataclass
class Measurement:
    system: str
    concurrency: int
    tokens_per_s: float
    tpot_ms: float
    ttft_ms: float | None


def measure_loraserve(engine: Engine, concurrency: int, new_tokens: int) -> Measurement:
    # like transformers' generate, no per-token logprobs are computed
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, chosen_logprob=False)
    requests = [engine.make_request(p, params) for p in PROMPTS[:concurrency]]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    start = time.perf_counter()
    for request in requests:
        engine.add(request)
    while engine.has_work():
        for output in engine.step():
            now = time.perf_counter()
            first.setdefault(output.request_id, now)
            last[output.request_id] = now
    wall = time.perf_counter() - start
    tpot = sum((last[r] - first[r]) / (new_tokens - 1) for r in first) / len(first)
    ttft = sum(first[r] - start for r in first) / len(first)
    return Measurement("loraserve", concurrency, concurrency * new_tokens / wall, tpot * 1e3, ttft * 1e3)


def measure_transformers(model, tokenizer, concurrency: int, new_tokens: int) -> Measurement:
    """Static batching with left padding: `generate` on all prompts at once (its natural multi-request use)."""
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS[:concurrency], return_tensors="pt", padding=True)

    def run(max_new: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
        return time.perf_counter() - start

    prefill = run(1)
    wall = run(new_tokens)
    return Measurement("transformers generate", concurrency, concurrency * new_tokens / wall,
                       (wall - prefill) / (new_tokens - 1) * 1e3, prefill * 1e3)


def measure_transformers_continuous(model, tokenizer, concurrency: int, new_tokens: int) -> Measurement:
    """transformers' own continuous batching (`generate_batch`), with EOS disabled so every request does full work."""
    from transformers import GenerationConfig

    inputs = [tokenizer.encode(p) for p in PROMPTS[:concurrency]]
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    outputs = model.generate_batch(inputs, generation_config=config)  # runs its own loop thread; no inference_mode
    wall = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    if generated == 0:
        raise RuntimeError("transformers generate_batch produced no tokens")
    return Measurement("transformers generate_batch", concurrency, generated / wall, float("nan"), None)


def memory_bandwidth_gbs() -> float:
    """Read bandwidth of a 1 GiB fp32 reduction, best of 5 (the floor's denominator)."""
    data = torch.ones(1 << 28, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def weight_bytes_per_token(engine: Engine) -> int:
    """Bytes of weights one decode step reads: every projection and the lm_head as stored, and every norm; of the
    embedding table only one row per token, which we neglect."""
    model = engine.core.runner.model
    others = sum(p.nbytes for m in model.modules() if not isinstance(m, (Linear, VocabEmbedding))
                 for p in m.parameters(recurse=False))
    return sum(linear_bytes(engine).values()) + others


def write_results(results: list[Measurement], floor: dict, args: argparse.Namespace) -> None:
    by = {(m.system, m.concurrency): m for m in results}
    lines = [
        f"{HEADING} ({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {machine()}, {torch.get_num_threads()} torch threads",
        f"- Command: `.venv/bin/python benchmarks/engine_throughput.py --new-tokens {args.new_tokens} "
        f"--dtype {args.dtype}`",
        f"- Workload: {args.new_tokens} new tokens per request (EOS ignored), greedy, prompts of 9-14 tokens, "
        f"dtype {args.dtype}, all requests submitted at once.",
        "",
        "| concurrency | loraserve tok/s | transformers `generate` tok/s | ratio | transformers `generate_batch` "
        "tok/s | ratio | loraserve TPOT ms | transformers `generate` TPOT ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in args.concurrency:
        ours, static = by[("loraserve", c)], by[("transformers generate", c)]
        continuous = by[("transformers generate_batch", c)]
        lines.append(
            f"| {c} | {ours.tokens_per_s:.1f} | {static.tokens_per_s:.1f} | "
            f"{ours.tokens_per_s / static.tokens_per_s:.2f} | {continuous.tokens_per_s:.1f} | "
            f"{ours.tokens_per_s / continuous.tokens_per_s:.2f} | {ours.tpot_ms:.1f} | {static.tpot_ms:.1f} |"
        )
    lines += [
        "",
        f"Single-stream decode against the memory floor: {floor['bytes'] / 1e6:.0f} MB of weights read per token, "
        f"measured read bandwidth {floor['bandwidth']:.1f} GB/s, floor {floor['floor_ms']:.1f} ms/token; "
        f"loraserve {floor['tpot_ms']:.1f} ms/token = **{floor['tpot_ms'] / floor['floor_ms']:.2f}x the floor** "
        f"({floor['bytes'] / floor['tpot_ms'] / 1e6:.1f} GB/s effective).",
        "",
        "![throughput](plots/engine_throughput.png)",
        "",
    ]
    replace_section(HEADING, lines)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "engine_throughput.json").write_text(json.dumps([m.__dict__ for m in results] + [floor], indent=1))
    plot(results, args.concurrency)


def plot(results: list[Measurement], concurrency: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = ["loraserve", "transformers generate", "transformers generate_batch"]
    width = 0.27
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, system in enumerate(systems):
        values = [next(m.tokens_per_s for m in results if m.system == system and m.concurrency == c)
                  for c in concurrency]
        positions = [j + (i - 1) * width for j in range(len(concurrency))]
        ax.bar(positions, values, width, label=system)
    ax.set_xticks(range(len(concurrency)), [str(c) for c in concurrency])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Gemma 3 270M on this CPU")
    ax.legend()
    fig.tight_layout()
    (HERE / "plots").mkdir(exist_ok=True)
    fig.savefig(HERE / "plots" / "engine_throughput.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    config = EngineConfig(dtype=args.dtype, max_running_requests=max(args.concurrency))
    engine = Engine.from_config(config)
    measure_loraserve(engine, 2, 4)  # warm-up
    results = []
    for c in args.concurrency:
        results.append(measure_loraserve(engine, c, args.new_tokens))
        print(results[-1], flush=True)
    single = next(m for m in results if m.concurrency == min(args.concurrency))
    bandwidth = memory_bandwidth_gbs()
    nbytes = weight_bytes_per_token(engine)
    floor = {"bytes": nbytes, "bandwidth": bandwidth, "floor_ms": nbytes / bandwidth / 1e6, "tpot_ms": single.tpot_ms}
    del engine

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path(config.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, args.dtype))
    measure_transformers(model, tokenizer, 2, 4)  # warm-up
    for c in args.concurrency:
        results.append(measure_transformers(model, tokenizer, c, args.new_tokens))
        print(results[-1], flush=True)
        results.append(measure_transformers_continuous(model, tokenizer, c, args.new_tokens))
        print(results[-1], flush=True)
    write_results(results, floor, args)


if __name__ == "__main__":
    main()
