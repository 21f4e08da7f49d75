"""Lesson 4: quantized weights, bf16 against int8 against int4: memory, speed and perplexity.

`--quantize int8` stores each linear layer's weights as 8-bit integers with one scale per output channel, `int4` as
4-bit integers with a scale per group of 32 (k/v projections in int8); activations stay bf16 and the weights are
expanded inside the matmul. Fewer bytes per weight means less memory and, since decoding one token reads every
weight once, faster decoding; the price is the rounding error, measured as perplexity on a text and as greedy
agreement with the unquantized model.

Each configuration loads in a process of its own, so its memory is its own: the figure is the growth of the
process's resident memory from before loading to after (freed pages handed back first). It counts everything the
engine keeps (the embedding table, unquantized in every configuration, the tokenizer, a small KV pool), so the
differences between the rows are the weights. Decode speed is one request's tokens per second after its first
token, and a batch's tokens per second.

    .venv/bin/python examples/quantization.py
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from common import (
    decode_seconds_per_token,
    engine_config,
    markdown_table,
    parse,
    parser,
    save_plot,
    shared_prefix,
)

from loraserve.engine.llm import LLM
from loraserve.sampling.params import SamplingParams

TEXT = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "perplexity.txt"
FORMATS = {"none": None, "int8": "int8", "int4": "int4"}  # --worker's choices -> EngineConfig.quantize
PROMPTS = ("The capital of France is", "Here is a recipe for pancakes:", "def fibonacci(n):",
           "The three laws of thermodynamics are")


def resident_bytes() -> int:
    """Resident memory after handing freed heap pages back to the system (glibc keeps them otherwise)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name is not None else None
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def perplexity(llm: LLM, text: str, window: int, windows: int | None) -> float:
    """exp(mean negative log-likelihood) of the text's tokens, read in windows of `window` words, each a prompt of
    its own (so each starts with BOS and sees no earlier window)."""
    words = text.split()
    chunks = [" ".join(words[i : i + window]) for i in range(0, len(words), window)][:windows]
    completions = llm.generate(chunks, SamplingParams(max_new_tokens=1, prompt_logprobs=0))
    logprobs = [entry[1] for completion in completions for entry in completion.prompt_logprobs]
    return math.exp(-sum(logprobs) / len(logprobs))


def worker(args: Any, quantize: str | None) -> dict[str, Any]:
    before = resident_bytes()
    # a small KV pool, the same in every row, so that the weights are most of what the memory figure holds
    llm = LLM(engine_config(args, quantize=quantize, max_running_requests=args.batch, kv_cache_memory=128 << 20))
    memory = resident_bytes() - before
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, chosen_logprob=False)
    llm.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4))  # warm-up: first calls pay for kernel setup
    single = llm.generate(PROMPTS[:1], params)[0]
    start = time.perf_counter()
    batch = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(args.batch)], params)
    batch_rate = sum(len(c.tokens) for c in batch) / (time.perf_counter() - start)
    greedy = [c.token_ids for c in llm.generate(list(PROMPTS), SamplingParams(max_new_tokens=args.new_tokens,
                                                                              ignore_eos=True))]
    return {
        "memory_mb": memory / 1e6, "decode_tok_s": 1 / decode_seconds_per_token(single),
        "batch_tok_s": batch_rate, "perplexity": perplexity(llm, args.text.read_text(), args.window, args.windows),
        "greedy": greedy,
    }


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """The share of greedy tokens generated before each sequence's first difference from the reference."""
    return sum(map(shared_prefix, tokens, reference)) / sum(map(len, reference))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    flags = parser(__doc__.splitlines()[0])
    flags.add_argument("--text", type=Path, default=TEXT, help=f"perplexity text (default {TEXT})")
    flags.add_argument("--window", type=int, default=None, help="words per perplexity window (300; --quick 40)")
    flags.add_argument("--windows", type=int, default=None, help="windows to score (default all; --quick 2)")
    flags.add_argument("--new-tokens", type=int, default=None, help="decoded tokens per request (64; --quick 8)")
    flags.add_argument("--batch", type=int, default=None, help="requests in the batch speed test (16; --quick 4)")
    flags.add_argument("--worker", choices=list(FORMATS), help=argparse.SUPPRESS)
    args = parse(flags, argv)
    args.window = args.window or (40 if args.quick else 300)
    args.windows = args.windows or (2 if args.quick else None)
    args.new_tokens = args.new_tokens or (8 if args.quick else 64)
    args.batch = args.batch or (4 if args.quick else 16)
    if args.worker is not None:
        print(json.dumps(worker(args, FORMATS[args.worker])))
        return {}
    unquantized = str(engine_config(args).torch_dtype()).removeprefix("torch.")
    results = {}
    for name, quantize in FORMATS.items():
        completed = subprocess.run([sys.executable, __file__, *(sys.argv[1:] if argv is None else argv),
                                    "--worker", name], stdout=subprocess.PIPE, text=True, check=True)
        results[quantize or unquantized] = json.loads(completed.stdout.strip().splitlines()[-1])
    names = list(results)
    reference = results[names[0]]
    reference_tokens = reference["greedy"]
    for name in names:
        row = results[name]
        row["memory_x"] = row["memory_mb"] / reference["memory_mb"]
        row["decode_x"] = row["decode_tok_s"] / reference["decode_tok_s"]
        row["perplexity_change_pct"] = (row["perplexity"] / reference["perplexity"] - 1) * 100
        row["greedy_agreement"] = agreement(row.pop("greedy"), reference_tokens)
    print(markdown_table(
        ["weights", "memory MB", "x", "decode tok/s (1 request)", "x", f"tok/s ({args.batch} requests)",
         "perplexity", "change", f"greedy = {names[0]}"],
        [[name, f"{r['memory_mb']:.0f}", f"{r['memory_x']:.2f}", f"{r['decode_tok_s']:.1f}", f"{r['decode_x']:.2f}",
          f"{r['batch_tok_s']:.1f}", f"{r['perplexity']:.3f}", f"{r['perplexity_change_pct']:+.2f}%",
          f"{r['greedy_agreement']:.2f}"] for name, r in results.items()],
    ))

    figure, panels = plt.subplots(1, 3, figsize=(10, 3.5))
    for axes, key, label in zip(panels, ("memory_mb", "decode_tok_s", "perplexity"),
                                ("process memory (MB)", "decode tokens/s, 1 request", "perplexity")):
        axes.bar(names, [results[name][key] for name in names], color=["#1f77b4", "#ff7f0e", "#2ca02c"])
        axes.set(title=label)
    figure.suptitle("Weight quantization")
    return {"rows": results, "plot": str(save_plot(figure, args.plots_dir, "quantization"))}


if __name__ == "__main__":
    main()
