"""A request as the engine core tracks it: token ids in, token ids out, KV blocks held."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from loraserve.adapters.cache import HostAdapter
from loraserve.adapters.merge import MergeSpec
from loraserve.sampling.grammar import GrammarState
from loraserve.sampling.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class AdapterRef:
    """Which adapter a request runs with, and the token to fetch it with (resolved once per request)."""

    adapter_id: str  # for a merge: the merge's key (`MergeSpec.key`)
    source: str = "hub"
    token: str | None = None
    merge: MergeSpec | None = None  # set: run with the merge of these adapters, all fetched from `source`

    @classmethod
    def merged(cls, spec: MergeSpec, source: str = "hub", token: str | None = None) -> AdapterRef:
        return cls(spec.key, source, token, spec)


@dataclass(eq=False)
class AdapterPin:
    """A request's hold on its adapter, owned by the residency: the host entry (never evicted while pinned) and the
    device slot while the request is admitted (-1 while it waits)."""

    entry: HostAdapter
    slot: int = -1


@dataclass
class RequestTimings:
    """Monotonic timestamps (seconds) of a request's life, for metrics and the `x-*` response headers."""

    arrival: float = field(default_factory=time.monotonic)  # made (validated and tokenized)
    adapter_ready: float | None = None  # its adapter was host-resident (read or downloaded), if it has one
    first_scheduled: float | None = None  # its first chunk ran: the end of its queueing
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue(self) -> float:
        return (self.first_scheduled or self.arrival) - self.arrival

    @property
    def inference(self) -> float:
        """From its first scheduled step to its end: prefill and decode, including waits inside the batch."""
        return (self.finished or time.monotonic()) - (self.first_scheduled or self.arrival)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


class FinishReason(enum.Enum):
    """Why a request ended; the values are LoRAX's wire names (`aborted` is ours: client gone or server stop)."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    ABORTED = "aborted"


@dataclass(eq=False)
class Request:
    """The core's view of a request. `num_computed_tokens` counts tokens whose K/V are in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int  # prompt + generated may not exceed this (model context or server limit)
    adapter: AdapterRef | None = None
    adapter_pin: AdapterPin | None = None  # set by the residency from `add` until the request ends
    slot_wait_steps: int = 0  # steps the scheduler passed it over for want of room on the device for its adapter
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    timings: RequestTimings = field(default_factory=RequestTimings)
    grammar: GrammarState | None = None  # set iff params.grammar: fed each output token once, kept on preemption

    @property
    def adapter_slot(self) -> int:
        """The device slot of its adapter while admitted; -1 for the base model or while waiting."""
        return self.adapter_pin.slot if self.adapter_pin is not None else -1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, stop: int) -> list[int]:
        """Tokens `[start, stop)` of prompt + output, without building the concatenation for decode steps."""
        prompt_len = len(self.prompt_token_ids)
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : stop - prompt_len]
        return self.all_token_ids[start:stop]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
