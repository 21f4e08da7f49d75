"""The synchronous step loop over token ids: schedule, run, update. It never sees text or asyncio.

A request with a grammar is fed each token it generates; it finishes as soon as the grammar is complete (or has
consumed EOS), with `EOS_TOKEN` (LoRAX's `eos_token`, OpenAI's `stop`): a new wire value would break clients that
parse the finish reason as an enum. `max_new_tokens` still cuts it short with `LENGTH`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from loraserve.engine.contracts import RunnerOutput, SampledToken, SchedulerOutput
from loraserve.engine.request import FinishReason, Request
from loraserve.engine.residency import AdapterResidency
from loraserve.engine.runner import ModelRunner
from loraserve.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class CoreOutput:
    """What one step did for one request."""

    request: Request
    new_token: SampledToken | None  # None for a prefill chunk that did not reach the end of the prompt
    prompt_logprobs: list | None = None

    @property
    def finished(self) -> bool:
        return self.request.is_finished


class EngineCore:
    """Every way a request leaves the batch passes through here, so here its adapter is released: finished,
    aborted (device use and host pin) or preempted (device use only; it acquires again when readmitted)."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, adapters: AdapterResidency,
                 eos_token_ids: set[int]) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.adapters = adapters
        self.eos_token_ids = frozenset(eos_token_ids)
        self._requests: dict[str, Request] = {}

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self._requests[request.request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> Request | None:
        """Stop a request at once and free its KV blocks; None if it is unknown or already finished."""
        request = self._requests.pop(request_id, None)
        if request is not None:
            request.finish_reason = FinishReason.ABORTED
            self.scheduler.finish(request)
            self.adapters.finish(request)
        return request

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[CoreOutput]:
        scheduled = self.scheduler.schedule()
        for request in scheduled.preempted:
            self.adapters.release(request)
        if not scheduled.chunks:
            return []
        return self._update(scheduled, self.runner.execute(scheduled))

    def _update(self, scheduled: SchedulerOutput, result: RunnerOutput) -> list[CoreOutput]:
        outputs = []
        for chunk in scheduled.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            token = result.sampled.get(request.request_id)
            if token is not None:
                request.output_token_ids.append(token.token_id)
                if request.grammar is not None and not request.grammar.consume(token.token_id):
                    logger.warning("request %s left its grammar: %s", request.request_id, request.grammar.error)
                reason = self._finish_reason(request, token.token_id)
                if reason is not None:
                    request.finish_reason = reason
                    self.scheduler.finish(request)
                    self.adapters.finish(request)
                    del self._requests[request.request_id]
            outputs.append(CoreOutput(request, token, result.prompt_logprobs.get(request.request_id)))
        return outputs

    def _finish_reason(self, request: Request, token_id: int) -> FinishReason | None:
        params = request.params
        if token_id in params.stop_token_ids:
            return FinishReason.EOS_TOKEN
        if request.grammar is not None:
            if request.grammar.is_stopped:  # complete, EOS consumed, or in error: nothing valid can follow
                return FinishReason.EOS_TOKEN
        elif not params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if len(request.output_token_ids) >= params.max_new_tokens or request.num_tokens >= request.max_total_tokens:
            return FinishReason.LENGTH
        return None
