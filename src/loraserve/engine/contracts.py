"""The only objects that cross the scheduler <-> runner seam.

A step is not "a prefill" or "a decode": it is a number of tokens for each scheduled request, computed on top of
what that request's KV cache already holds. Chunked prefill, decode and recompute after preemption are all that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.engine.request import Request


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `request`, starting at `request.num_computed_tokens`."""

    request: Request
    num_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """True when this chunk reaches the request's last known token, so the step samples its next one."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)  # sent back to waiting this step, blocks freed

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


@dataclass
class RunnerOutput:
    # request id -> the token sampled for it (only for chunks that complete their sequence)
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    # request id -> logprob entries for the prompt tokens this step computed (only when asked for)
    prompt_logprobs: dict[str, list] = field(default_factory=dict)
