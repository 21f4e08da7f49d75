"""Lesson 1: prefill against decode, with and without the KV cache.

With the cache (loraserve's normal path) the prompt is prefilled once, in one step, and every later token is one
decode step that reads the keys and values already cached. Without it, every new token means running the whole
sequence again: here each token is its own request with max_new_tokens=1 whose prompt is the token ids of the
prompt plus everything generated so far, so the engine prefills all of it from scratch (loraserve keeps no prefix
cache across requests). Both paths decode greedily, so they write the same text up to rounding: in float32 every
token matches; in bfloat16 a token's keys and values come out of a differently shaped matmul when prefilled than
when decoded, and where two candidate tokens are nearly tied the greedy choice can flip. The program reports how many
leading tokens the two paths share.

    .venv/bin/python examples/kv_cache.py
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
from common import drive, engine_config, markdown_table, parse, parser, save_plot, shared_prefix

from loraserve.engine.api import AsyncEngine, collect
from loraserve.sampling.params import SamplingParams

PROMPT = (
    "A language model writes one token at a time. To choose each token it attends to every token before it, so "
    "the keys and values of the whole sequence are needed at every step. Computing them once and keeping them is "
    "the key-value cache: the prompt is processed in one large parallel pass, the prefill, and each new token then "
    "costs one small pass, a decode step, that adds a single row of keys and values. Without the cache every step "
    "repeats the work of all the steps before it, and the cost of a token grows with the length of the text. "
    "The lighthouse keeper wrote in his log that the winter had been long, that the supply boat was late again, "
    "and that"
)


async def with_cache(engine: AsyncEngine, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """One request: the prefill's time (with its first token), then each decode step's time."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, chosen_logprob=False)
    tokens: list[int] = []
    times: list[float] = []
    last = time.perf_counter()
    async for output in engine.generate(prompt, params):
        now = time.perf_counter()
        for token in output.tokens:
            tokens.append(token.id)
            times.append(now - last)
        last = now
    return tokens, times


async def without_cache(engine: AsyncEngine, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """A fresh request per token, prefilling the prompt and every token generated so far."""
    params = SamplingParams(max_new_tokens=1, ignore_eos=True, chosen_logprob=False)
    sequence = list(prompt)
    times: list[float] = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        completion = await collect(engine.generate(sequence, params))
        times.append(time.perf_counter() - start)
        sequence.extend(completion.token_ids)
    return sequence[len(prompt):], times


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    flags = parser(__doc__.splitlines()[0])
    flags.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 128; --quick 8)")
    args = parse(flags, argv)
    new_tokens = args.new_tokens or (8 if args.quick else 128)

    async def scenario(engine: AsyncEngine) -> dict[str, Any]:
        prompt = engine.tokenizer.encode(PROMPT)
        await with_cache(engine, prompt, 4)  # warm-up: first calls into each kernel pay for its setup
        cached_tokens, cached = await with_cache(engine, prompt, new_tokens)
        uncached_tokens, uncached = await without_cache(engine, prompt, new_tokens)
        return {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "cached": cached, "uncached": uncached,
                "shared_tokens": shared_prefix(cached_tokens, uncached_tokens)}

    run = drive(engine_config(args), scenario)
    cached, uncached = run["cached"], run["uncached"]
    decode = sum(cached[1:]) / (len(cached) - 1)
    figures = {
        "prompt_tokens": run["prompt_tokens"],
        "new_tokens": new_tokens,
        "prefill_ms": cached[0] * 1e3,
        "prefill_ms_per_prompt_token": cached[0] * 1e3 / run["prompt_tokens"],
        "decode_ms_per_token": decode * 1e3,
        "cached_total_s": sum(cached),
        "uncached_first_token_ms": uncached[0] * 1e3,
        "uncached_last_token_ms": uncached[-1] * 1e3,
        "uncached_total_s": sum(uncached),
        "speedup": sum(uncached) / sum(cached),
        "shared_tokens": run["shared_tokens"],
    }
    print(markdown_table(
        ["", "with KV cache", "without (re-prefill per token)"],
        [["first token (prefill) ms", f"{figures['prefill_ms']:.1f}", f"{figures['uncached_first_token_ms']:.1f}"],
         ["later tokens ms each", f"{figures['decode_ms_per_token']:.1f} (mean decode step)",
          f"up to {figures['uncached_last_token_ms']:.1f} (last token)"],
         [f"{new_tokens} tokens total s", f"{figures['cached_total_s']:.2f}", f"{figures['uncached_total_s']:.2f}"]],
    ))
    print(f"prompt: {figures['prompt_tokens']} tokens, prefilled at "
          f"{figures['prefill_ms_per_prompt_token']:.2f} ms per token against {figures['decode_ms_per_token']:.1f} ms "
          f"per decoded token; the cache makes the whole run {figures['speedup']:.1f}x faster; the two paths share "
          f"their first {figures['shared_tokens']} of {new_tokens} tokens")

    figure, axes = plt.subplots(figsize=(7, 4))
    positions = range(1, new_tokens + 1)
    axes.plot(positions, [t * 1e3 for t in uncached], label="without KV cache (re-prefill)")
    axes.plot(positions, [t * 1e3 for t in cached], label="with KV cache (prefill, then decode)")
    axes.set(xlabel="generated token", ylabel="time for this token (ms)", yscale="log",
             title=f"KV cache: {figures['prompt_tokens']}-token prompt, {new_tokens} new tokens")
    axes.legend()
    figures["plot"] = str(save_plot(figure, args.plots_dir, "kv_cache"))
    return figures


if __name__ == "__main__":
    main()
