"""Lesson 2: batching trades latency for throughput.

A batch of B requests, all sent at once, decodes B tokens per step for little more than the cost of one: the weights
are read once per step whatever B is, and on a small model reading them is most of the step. So throughput (tokens
per second, all requests together) climbs with B while each request's latency (from being sent to its last token)
climbs too, because every step now does B rows of work.

    .venv/bin/python examples/batching.py
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
from common import (
    decode_seconds_per_token,
    engine_config,
    latency_seconds,
    markdown_table,
    parse,
    parser,
    save_plot,
)

from loraserve.engine.llm import LLM
from loraserve.sampling.params import SamplingParams

TOPICS = ("the printing press", "vaccines", "the colour of the sky", "chess", "compilers", "the water cycle",
          "honeybees", "black holes")


def measure(llm: LLM, batch_size: int, new_tokens: int) -> dict[str, float]:
    """Send `batch_size` requests at once; throughput over the whole batch, latency and decode step per request."""
    prompts = [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}." for i in range(batch_size)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, chosen_logprob=False)
    start = time.perf_counter()
    completions = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    latencies = [latency_seconds(c) for c in completions]
    return {
        "batch": batch_size,
        "throughput_tok_s": sum(len(c.tokens) for c in completions) / seconds,
        "mean_latency_s": sum(latencies) / len(latencies),
        "decode_ms_per_token": 1e3 * sum(map(decode_seconds_per_token, completions)) / len(completions),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    flags = parser(__doc__.splitlines()[0])
    flags.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                       help="default 1 2 4 8 16 32 64; --quick 1 2 4")
    flags.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 32; --quick 4)")
    args = parse(flags, argv)
    batch_sizes = args.batch_sizes or ([1, 2, 4] if args.quick else [1, 2, 4, 8, 16, 32, 64])
    new_tokens = args.new_tokens or (4 if args.quick else 32)
    llm = LLM(engine_config(args, max_running_requests=max(batch_sizes)))
    measure(llm, 2, 4)  # warm-up: first calls into each kernel pay for its setup
    rows = [measure(llm, size, new_tokens) for size in batch_sizes]
    print(markdown_table(
        ["batch", "throughput tok/s", "mean latency s", "decode step ms"],
        [[r["batch"], f"{r['throughput_tok_s']:.1f}", f"{r['mean_latency_s']:.2f}", f"{r['decode_ms_per_token']:.1f}"]
         for r in rows],
    ))
    first, last = rows[0], rows[-1]
    print(f"batch {last['batch']} against batch {first['batch']}: "
          f"{last['throughput_tok_s'] / first['throughput_tok_s']:.1f}x the throughput, "
          f"{last['mean_latency_s'] / first['mean_latency_s']:.1f}x the latency ({new_tokens} tokens per request)")

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot([r["throughput_tok_s"] for r in rows], [r["mean_latency_s"] for r in rows], marker="o")
    for r in rows:
        axes.annotate(f"B={r['batch']}", (r["throughput_tok_s"], r["mean_latency_s"]), textcoords="offset points",
                      xytext=(4, -10))
    axes.set(xlabel="throughput (tokens/s, whole batch)", ylabel="mean request latency (s)",
             title=f"Batching: {new_tokens} tokens per request")
    return {"rows": rows, "new_tokens": new_tokens, "plot": str(save_plot(figure, args.plots_dir, "batching"))}


if __name__ == "__main__":
    main()
