"""Cost of constrained decoding per decode step at batch 32, on the default model (Gemma 3, 262k vocabulary).

Runs 32 requests twice through the engine: unconstrained (the decode step time to compare against), then all
constrained by one JSON schema, timing the grammar work inside each decode step where all 32 rows are constrained:
filling the bitmask (llguidance), applying it to the logits (torch), and feeding the chosen tokens back. Also reports
the one-off costs: building llguidance's tokenizer and compiling the schema. Aim: grammar work <= 10% of a step.

    .venv/bin/python benchmarks/grammar_mask.py [--new-tokens 32] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from results_file import machine, replace_section

from loraserve.config import EngineConfig
from loraserve.engine import runner as runner_module
from loraserve.engine.engine import Engine
from loraserve.sampling import grammar, sampler
from loraserve.sampling.grammar import GrammarSpec, GrammarState
from loraserve.sampling.params import SamplingParams

BATCH = 32
HEADING = "## Constrained decoding: grammar cost per decode step, default model"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 6},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "bio": {"type": "string", "maxLength": 400},
    },
    "required": ["name", "age", "role", "tags", "address", "bio"],
    "additionalProperties": False,
}
PEOPLE = ["a retired sailor", "a young chemist", "a chess coach", "a baker in Lyon", "a jazz drummer",
          "a volcano researcher", "a school nurse", "a bus driver"]


class Timer:
    """Accumulates the wall time of the wrapped calls, per name, into the current step's buckets."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start
        return timed


def decode_steps(
    engine: Engine, params: list[SamplingParams], timer: Timer | None = None
) -> tuple[list[tuple[float, dict[str, float]]], list[list[int]]]:
    """(step seconds, grammar seconds per part) for each step in which all BATCH requests decoded, and the tokens
    of each request."""
    prompts = [f"Describe {PEOPLE[i % len(PEOPLE)]} (person {i}) as JSON." for i in range(len(params))]
    requests = [engine.make_request(prompt, p) for prompt, p in zip(prompts, params)]
    for request in requests:
        engine.add(request)
    steps = []
    while engine.has_work():
        decoding = len(engine.core.scheduler.running) == BATCH and not engine.core.scheduler.waiting
        if timer is not None:
            timer.current = {}
        start = time.perf_counter()
        engine.step()
        if decoding:
            steps.append((time.perf_counter() - start, dict(timer.current) if timer is not None else {}))
    return steps, [r.output_token_ids for r in requests]


def replay(engine: Engine, spec: GrammarSpec, outputs: list[list[int]]) -> list[float]:
    """Seconds per step of the grammar work alone (fill, apply to a 262k-wide float32 batch, consume), replaying
    the constrained run's tokens without the model: the same work, less exposed to other processes' load."""
    states = [engine.grammars.new_state(spec) for _ in outputs]
    logits = torch.randn(len(outputs), engine.grammars.vocab_size)
    times = []
    for step in range(min(len(tokens) for tokens in outputs)):
        start = time.perf_counter()
        grammar.apply_bitmask_(logits, grammar.fill_bitmask(states), list(range(len(states))))
        for state, tokens in zip(states, outputs):
            state.consume(tokens[step])
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    engine = Engine.from_config(EngineConfig(dtype=args.dtype, max_running_requests=BATCH))
    plain = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, chosen_logprob=False)
    decode_steps(engine, [plain] * 4)  # warm-up
    base, _ = decode_steps(engine, [plain] * BATCH)

    start = time.perf_counter()
    engine.grammars.prepare()
    tokenizer_s = time.perf_counter() - start
    spec = GrammarSpec.json_schema(SCHEMA)
    start = time.perf_counter()
    engine.grammars.new_state(spec)
    compile_s = time.perf_counter() - start

    timer = Timer()
    runner_module.fill_bitmask = timer.wrap("fill", grammar.fill_bitmask)
    sampler.apply_bitmask_ = timer.wrap("apply", grammar.apply_bitmask_)
    GrammarState.consume = timer.wrap("consume", GrammarState.consume)
    # greedy like the unconstrained run, so the two differ only by the grammar
    constrained = [SamplingParams(max_new_tokens=args.new_tokens, chosen_logprob=False, grammar=spec)] * BATCH
    steps, outputs = decode_steps(engine, constrained, timer)
    alone_ms = statistics.median(replay(engine, spec, outputs)) * 1e3

    base_ms = statistics.median(s for s, _ in base) * 1e3
    step_ms = statistics.median(s for s, _ in steps) * 1e3
    parts = {name: statistics.median(g.get(name, 0.0) for _, g in steps) * 1e3 for name in ("fill", "apply", "consume")}
    total_ms = statistics.median(sum(g.values()) for _, g in steps) * 1e3
    lines = [
        f"{HEADING} ({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {machine()}, {torch.get_num_threads()} torch threads; load "
        f"average {os.getloadavg()[0]:.2f} at the end. Command: `.venv/bin/python benchmarks/grammar_mask.py`",
        f"- Workload: {BATCH} requests, {args.new_tokens} new tokens, greedy, {args.dtype}; every row constrained by "
        "one 6-field JSON schema in the constrained run.",
        f"- One-off: llguidance tokenizer build {tokenizer_s:.2f} s (once per engine, at start-up); schema compile "
        f"{compile_s * 1e3:.1f} ms (once per schema, cached).",
        f"- Unconstrained decode step: {base_ms:.1f} ms; constrained: {step_ms:.1f} ms (medians).",
        f"- Grammar work per step inside the engine: **{total_ms:.2f} ms = {100 * total_ms / base_ms:.1f}%** of the "
        "unconstrained step (" + ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items()) + "); replayed without "
        f"the model: {alone_ms:.2f} ms = {100 * alone_ms / base_ms:.1f}%. Aim: <= 10%.",
        "",
    ]
    print("\n".join(lines))
    replace_section(HEADING, lines)

if __name__ == "__main__":
    main()
