"""Lessons 2 and 3: static against continuous batching, on the same arrivals.

One seeded trace of requests, Poisson arrivals and output lengths spread from short to long, is replayed twice on
the same engine:
- static: requests wait until a full batch has arrived (the last batch goes when the trace ends), the batch runs
  until its longest request is done, and only then does the next batch start; every reply goes back when its batch
  ends, as a static batcher returns the batch's results together. (Rows that finish early cost nothing here, since
  the engine drops them, so this is kinder to static batching than a padded batch would be.)
- continuous: each request is sent when it arrives; loraserve's scheduler admits it into the running batch at the
  next step and returns it as soon as it is done, so a short request never waits for a long one.

    .venv/bin/python examples/continuous_batching.py
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
from common import drive, engine_config, markdown_table, parse, parser, percentile, save_plot

from loraserve.engine.api import AsyncEngine, Completion, collect
from loraserve.sampling.params import SamplingParams

PROMPTS = ("Tell me about the printing press.", "Explain how vaccines work.", "Why is the sky blue?",
           "Describe the rules of chess.", "How does a compiler work?", "Describe the water cycle.")


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the trace starts
    prompt: str
    new_tokens: int


@dataclass(frozen=True)
class Span:
    """One request's life, in seconds after the trace starts."""

    arrived: float
    started: float  # its first step ran
    replied: float  # its reply went back (static: when its batch ended)
    tokens: int

    @property
    def latency(self) -> float:
        return self.replied - self.arrived


def make_trace(count: int, rate: float, shortest: int, longest: int, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    clock, trace = 0.0, []
    for i in range(count):
        trace.append(Arrival(clock, PROMPTS[i % len(PROMPTS)], rng.randint(shortest, longest)))
        clock += rng.expovariate(rate)
    return trace


async def run(engine: AsyncEngine, arrival: Arrival) -> Completion:
    params = SamplingParams(max_new_tokens=arrival.new_tokens, ignore_eos=True, chosen_logprob=False)
    return await collect(engine.generate(arrival.prompt, params))


async def wait_until(start: float, offset: float) -> None:
    await asyncio.sleep(max(0.0, start + offset - time.monotonic()))


async def continuous(engine: AsyncEngine, trace: list[Arrival]) -> list[Span]:
    start = time.monotonic()  # the clock of the engine's request timings

    async def one(arrival: Arrival) -> Span:
        await wait_until(start, arrival.at)
        timings = (await run(engine, arrival)).timings
        return Span(arrival.at, timings.first_scheduled - start, timings.finished - start, arrival.new_tokens)

    return list(await asyncio.gather(*(one(arrival) for arrival in trace)))


async def static(engine: AsyncEngine, trace: list[Arrival], batch_size: int) -> list[Span]:
    start = time.monotonic()
    spans = []
    for first in range(0, len(trace), batch_size):
        batch = trace[first : first + batch_size]
        await wait_until(start, batch[-1].at)  # a full batch (or the end of the trace)
        completions = await asyncio.gather(*(run(engine, arrival) for arrival in batch))
        ended = time.monotonic() - start
        spans += [Span(arrival.at, completion.timings.first_scheduled - start, ended, arrival.new_tokens)
                  for arrival, completion in zip(batch, completions)]
    return spans


def summary(spans: list[Span]) -> dict[str, float]:
    latencies = [span.latency for span in spans]
    makespan = max(span.replied for span in spans)
    return {
        "throughput_tok_s": sum(span.tokens for span in spans) / makespan,
        "mean_latency_s": sum(latencies) / len(latencies),
        "p50_latency_s": percentile(latencies, 0.5),
        "p90_latency_s": percentile(latencies, 0.9),
        "mean_wait_s": sum(span.started - span.arrived for span in spans) / len(spans),
        "makespan_s": makespan,
    }


def plot_timelines(results: dict[str, list[Span]], plots_dir: Any, title: str) -> str:
    figure, rows = plt.subplots(len(results), 1, figsize=(8, 5), sharex=True)
    for axes, (policy, spans) in zip(rows, results.items()):
        for i, span in enumerate(spans):
            axes.barh(i, span.started - span.arrived, left=span.arrived, color="#d0d0d0")
            axes.barh(i, span.replied - span.started, left=span.started, color="#1f77b4")
        axes.set(ylabel="request", title=f"{policy}: grey = waiting, blue = in the batch until its reply")
        axes.invert_yaxis()
    rows[-1].set_xlabel("seconds since the first arrival")
    figure.suptitle(title)
    return str(save_plot(figure, plots_dir, "continuous_batching"))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    flags = parser(__doc__.splitlines()[0])
    flags.add_argument("--requests", type=int, default=None, help="requests in the trace (default 32; --quick 8)")
    flags.add_argument("--rate", type=float, default=None, help="arrivals per second (default 2; --quick 50)")
    flags.add_argument("--batch-size", type=int, default=None, help="static batch size (default 8; --quick 4)")
    flags.add_argument("--seed", type=int, default=0)
    args = parse(flags, argv)
    count = args.requests or (8 if args.quick else 32)
    rate = args.rate or (50.0 if args.quick else 2.0)
    batch_size = args.batch_size or (4 if args.quick else 8)
    shortest, longest = (2, 16) if args.quick else (8, 128)
    trace = make_trace(count, rate, shortest, longest, args.seed)

    async def scenario(engine: AsyncEngine) -> dict[str, list[Span]]:
        await run(engine, Arrival(0.0, PROMPTS[0], 4))  # warm-up: first calls into each kernel pay for its setup
        return {"static": await static(engine, trace, batch_size), "continuous": await continuous(engine, trace)}

    results = drive(engine_config(args), scenario)
    figures = {policy: summary(spans) for policy, spans in results.items()}
    print(f"{count} requests, Poisson arrivals at {rate:g}/s, {shortest}-{longest} new tokens each "
          f"(seed {args.seed}); static batches of {batch_size}")
    print(markdown_table(
        ["policy", "throughput tok/s", "mean latency s", "p50 s", "p90 s", "mean wait s", "all done s"],
        [[policy, f"{f['throughput_tok_s']:.1f}", f"{f['mean_latency_s']:.2f}", f"{f['p50_latency_s']:.2f}",
          f"{f['p90_latency_s']:.2f}", f"{f['mean_wait_s']:.2f}", f"{f['makespan_s']:.2f}"]
         for policy, f in figures.items()],
    ))
    gain = figures["static"]["mean_latency_s"] / figures["continuous"]["mean_latency_s"]
    print(f"continuous batching: {gain:.1f}x lower mean latency, "
          f"{figures['continuous']['throughput_tok_s'] / figures['static']['throughput_tok_s']:.2f}x the throughput")
    title = f"{count} requests at {rate:g}/s, {shortest}-{longest} tokens each, static batches of {batch_size}"
    return {**figures, "plot": plot_timelines(results, args.plots_dir, title)}


if __name__ == "__main__":
    main()
