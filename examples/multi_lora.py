"""Lessons 5 and 6: one LoRA and many LoRAs in one batch.

A LoRA adapter adds x A^T B^T to a projection's output. loraserve runs every request of a batch through the base
weights together, then adds each request's own adapter delta, so requests for different adapters (and for no
adapter) share one batch. This program measures a batch of requests on the base model, on one adapter, and spread
over many distinct adapters, and the same requests one at a time; and checks that each request's greedy tokens in the
mixed batch are the ones it gets alone: in float32 they are, token for token; in bfloat16 a batch goes through
differently shaped matmuls than one row does, the rounding differs, and where two candidate tokens are nearly
tied the greedy choice can flip, after which that request writes another text. So the program reports the requests
that match in full, the share of tokens before each request's first difference, and the largest logprob difference
over those shared tokens.

Adapters: any PEFT LoRA folders for the model (default: the lesson's, examples/adapters/*/). When more distinct
adapters are asked for than folders given, the rest are copies of them with every B matrix scaled by a seeded factor
between 0.5 and 1.5: other weights, so another adapter to the server, with outputs of its own. Every adapter is read
once before the timed runs, so no timed run pays for reading files, and each batch runs twice, the faster run
counting (other work on the machine only ever slows a run down).

    .venv/bin/python examples/multi_lora.py
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from common import EXAMPLES, engine_config, markdown_table, parse, parser, save_plot, shared_prefix
from safetensors.torch import load_file, save_file

from loraserve.engine.api import AdapterRef, Completion
from loraserve.engine.llm import LLM
from loraserve.sampling.params import SamplingParams

WEIGHTS = "adapter_model.safetensors"
PROMPTS = ("Write a short paragraph about the sea.", "STOP ARRIVED LONDON MONDAY STOP", "Summarize the article.",
           "Alice met Bob in Paris.", "The capital of France is", "Once upon a time", "def add(a, b):",
           "List three colours:")


def lesson_adapters() -> list[Path]:
    return sorted(path.parent for path in (EXAMPLES / "adapters").glob(f"*/{WEIGHTS}"))


def variants(sources: list[Path], count: int, root: Path) -> list[Path]:
    """`count` distinct adapters: the source folders, then copies of them with their B matrices rescaled."""
    folders = list(sources[:count])
    rng = random.Random(0)
    for index in range(len(folders), count):
        source = sources[index % len(sources)]
        target = root / f"{source.name}-variant-{index}"
        shutil.copytree(source, target)
        scale = rng.uniform(0.5, 1.5)
        tensors = load_file(source / WEIGHTS)
        save_file({name: tensor * scale if "lora_B" in name else tensor for name, tensor in tensors.items()},
                  target / WEIGHTS)
        folders.append(target)
    return folders


def timed(llm: LLM, prompts: list[str], params: SamplingParams,
          adapters: list[AdapterRef | None]) -> tuple[list[Completion], float]:
    """The completions of one batch and its output tokens per second, the faster of two runs."""
    rates = []
    for _ in range(2):
        start = time.perf_counter()
        completions = llm.generate(prompts, params, adapters)
        rates.append(sum(len(c.tokens) for c in completions) / (time.perf_counter() - start))
    return completions, max(rates)


def one_at_a_time(llm: LLM, prompts: list[str], params: SamplingParams,
                  adapters: list[AdapterRef | None]) -> tuple[list[Completion], float]:
    start = time.perf_counter()
    completions = [llm.generate([prompt], params, [adapter])[0] for prompt, adapter in zip(prompts, adapters)]
    return completions, sum(len(c.tokens) for c in completions) / (time.perf_counter() - start)


def max_logprob_gap(batched: list[Completion], alone: list[Completion]) -> float:
    """The largest difference between a token's logprob in the mixed batch and alone, over the tokens before each
    request's first difference (later tokens follow different texts)."""
    return max((abs(a.logprob - b.logprob) for x, y in zip(batched, alone)
                for a, b in zip(x.tokens[:shared_prefix(x.token_ids, y.token_ids)], y.tokens)), default=0.0)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    flags = parser(__doc__.splitlines()[0])
    flags.add_argument("--adapters", type=Path, nargs="+", default=None,
                       help="PEFT adapter folders for the model (default: examples/adapters/*/)")
    flags.add_argument("--distinct", type=int, default=None, help="distinct adapters in the batch (8; --quick 4)")
    flags.add_argument("--requests", type=int, default=None, help="requests per batch (32; --quick 8)")
    flags.add_argument("--new-tokens", type=int, default=None, help="tokens per request (32; --quick 6)")
    args = parse(flags, argv)
    sources = [path.resolve() for path in args.adapters] if args.adapters else lesson_adapters()
    if not sources:
        flags.error("no adapters: train the lesson's with examples/train_adapters.py or pass --adapters")
    distinct = args.distinct or (4 if args.quick else 8)
    requests = args.requests or (8 if args.quick else 32)
    new_tokens = args.new_tokens or (6 if args.quick else 32)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    llm = LLM(engine_config(args, max_running_requests=requests))

    with tempfile.TemporaryDirectory(prefix="lesson-adapters-") as scratch:
        refs = [AdapterRef(str(folder), "local") for folder in variants(sources, distinct, Path(scratch))]
        llm.generate(["warm-up"] * len(refs), SamplingParams(max_new_tokens=2), refs)  # read every adapter once
        mixed_refs = [refs[i % distinct] for i in range(requests)]
        base, base_rate = timed(llm, prompts, params, [None] * requests)
        _, one_rate = timed(llm, prompts, params, [refs[0]] * requests)
        mixed, mixed_rate = timed(llm, prompts, params, mixed_refs)
        alone, alone_rate = one_at_a_time(llm, prompts, params, mixed_refs)

    same = sum(m.token_ids == a.token_ids for m, a in zip(mixed, alone))
    shared = sum(shared_prefix(m.token_ids, a.token_ids) for m, a in zip(mixed, alone)) / (requests * new_tokens)
    changed = sum(m.token_ids != b.token_ids for m, b in zip(mixed, base))
    figures = {
        "requests": requests, "distinct_adapters": distinct, "new_tokens": new_tokens,
        "base_tok_s": base_rate, "one_lora_tok_s": one_rate, "many_lora_tok_s": mixed_rate,
        "one_at_a_time_tok_s": alone_rate, "same_as_alone": same, "shared_token_share": shared,
        "changed_by_adapter": changed,
        "max_logprob_gap": max_logprob_gap(mixed, alone),
    }
    print(markdown_table(
        ["batch of requests", "tok/s", "x base"],
        [[f"{requests} on the base model", f"{base_rate:.1f}", "1.00"],
         [f"{requests} on one adapter", f"{one_rate:.1f}", f"{one_rate / base_rate:.2f}"],
         [f"{requests} over {distinct} adapters", f"{mixed_rate:.1f}", f"{mixed_rate / base_rate:.2f}"],
         [f"the same {requests}, one at a time", f"{alone_rate:.1f}", f"{alone_rate / base_rate:.2f}"]],
    ))
    print(f"mixed batch against one at a time: the same greedy tokens for {same} of {requests} requests, "
          f"{shared:.0%} of all tokens before a request's first difference, logprobs there within "
          f"{figures['max_logprob_gap']:.2g}; {changed} of {requests} differ from the base model's, so the adapters "
          f"are applied; batching them is {mixed_rate / alone_rate:.1f}x faster")

    figure, axes = plt.subplots(figsize=(7, 4))
    labels = ["base", "1 adapter", f"{distinct} adapters", "one at a time"]
    axes.bar(labels, [base_rate, one_rate, mixed_rate, alone_rate], color=["#7f7f7f", "#1f77b4", "#ff7f0e", "#d62728"])
    axes.set(ylabel="output tokens/s", title=f"Multi-LoRA: {requests} requests x {new_tokens} tokens")
    figures["plot"] = str(save_plot(figure, args.plots_dir, "multi_lora"))
    return figures


if __name__ == "__main__":
    main()
