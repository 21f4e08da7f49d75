"""Several generations for one request: OpenAI's `n` choices and LoRAX's `best_of` sequences."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from loraserve.engine.api import Completion, RequestOutput, collect
from loraserve.sampling.params import SamplingParams

_SEEDS = 2**64


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s parameters: seeded choices get distinct seeds, so they differ from each other but each is
    reproducible (wrapping, so the largest seed stays a valid one)."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % _SEEDS)


async def collect_all(streams: list[AsyncIterator[RequestOutput]]) -> list[Completion]:
    """Every stream drained together, in order. The first failure cancels the others (which aborts their requests:
    nobody would read them) and is raised as it is."""
    tasks = [asyncio.ensure_future(collect(stream)) for stream in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def mean_logprob(completion: Completion) -> float:
    """What `best_of` ranks by, as TGI and LoRAX do: the mean logprob of the generated tokens."""
    logprobs = [token.logprob for token in completion.tokens if token.logprob is not None]
    return sum(logprobs) / len(logprobs) if logprobs else float("-inf")


def best_first(completions: list[Completion]) -> list[Completion]:
    """`best_of`'s answer first (the highest mean logprob; the earliest on ties), then the others in order."""
    best = max(range(len(completions)), key=lambda i: (mean_logprob(completions[i]), -i))
    return [completions[best], *completions[:best], *completions[best + 1:]]
