"""A synchronous offline facade for scripts, tests and benchmarks: prompts in, finished completions out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine, RequestOutput, TokenInfo
from loraserve.engine.request import AdapterRef, FinishReason, RequestTimings
from loraserve.sampling.params import SamplingParams


@dataclass
class Completion:
    request_id: str
    prompt_tokens: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_logprobs: list | None = None
    timings: RequestTimings | None = None

    @property
    def token_ids(self) -> list[int]:
        return [token.id for token in self.tokens]


class LLM:
    def __init__(self, config: EngineConfig | None = None, engine: Engine | None = None) -> None:
        self.engine = engine if engine is not None else Engine.from_config(config or EngineConfig())

    def generate(
        self, prompts: Sequence[str | list[int]], params: SamplingParams | Sequence[SamplingParams],
        adapters: Sequence[AdapterRef | None] | None = None,
    ) -> list[Completion]:
        """Run all prompts through the continuous batcher together (each with its adapter, None = base model);
        results in prompt order."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        per_adapter = list(adapters) if adapters is not None else [None] * len(prompts)
        if not len(per_prompt) == len(per_adapter) == len(prompts):
            raise ValueError(f"{len(prompts)} prompts, {len(per_prompt)} parameter sets, {len(per_adapter)} adapters")
        requests = [self.engine.make_request(p, sp, adapter=a) for p, sp, a in zip(prompts, per_prompt, per_adapter)]
        completions = {r.request_id: Completion(r.request_id, len(r.prompt_token_ids)) for r in requests}
        for added, request in enumerate(requests):
            try:
                self.engine.add(request)
            except Exception:
                for earlier in requests[:added]:  # leave the engine as it was
                    self.engine.abort(earlier.request_id)
                raise
        while self.engine.has_work():
            for output in self.engine.step():
                _accumulate(completions[output.request_id], output)
        return [completions[r.request_id] for r in requests]


def _accumulate(completion: Completion, output: RequestOutput) -> None:
    completion.tokens.extend(output.tokens)
    if output.finished:
        completion.text = output.generated_text or ""
        completion.finish_reason = output.finish_reason
        completion.prompt_logprobs = output.prompt_logprobs
        completion.timings = output.timings


async def collect(outputs: AsyncIterator[RequestOutput]) -> Completion:
    """Drain an async stream of outputs (from `AsyncEngine.generate`) into one completion."""
    completion: Completion | None = None
    async for output in outputs:
        if completion is None:
            completion = Completion(output.request_id, output.prompt_tokens)
        _accumulate(completion, output)
    if completion is None:
        raise RuntimeError("the engine ended a request without any output")
    return completion
