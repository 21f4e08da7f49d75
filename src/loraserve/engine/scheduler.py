"""Continuous batching: who runs this step, and with how many tokens.

Rule of one step: running requests first, oldest first, each gets the tokens it still needs (one for a decode, the
rest of its prompt for a chunked prefill) within the step's token budget. When the KV pool cannot hold a running
request's next tokens, the newest running request is preempted: its blocks are freed and it goes back to the head of
the queue, to be recomputed from its prompt and the tokens it already produced (nothing is lost; the sampler's seeded
draws depend only on the request, so even sampled output is unchanged). If nothing was preempted, waiting requests
are admitted in arrival order while the budget, the sequence cap and the pool allow; a prompt longer than the
remaining budget is admitted with a first chunk and continues next step. A request whose adapter cannot be put on
the device yet (the adapter memory is held by requests in flight) is passed over and keeps its place; the others go
ahead. The adapter residency answers that question (`AdapterGate`); the scheduler only asks it.

No adapter starves: requests for the adapters already resident could keep the device memory busy forever. Once a
request has been passed over for `max_slot_wait_steps` steps, no later request that still needs room is admitted
until it is, so the memory drains as their requests finish and the least recently used adapters make room for the
starving one. Its wait is bounded by that many steps plus the longest remaining generation on the device;
base-model requests keep flowing.

Pure Python, no torch: it is tested with synthetic requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from loraserve.engine.block_manager import BlockManager
from loraserve.engine.contracts import ScheduledChunk, SchedulerOutput
from loraserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerLimits:
    max_batch_tokens: int  # tokens computed per step (prefill chunks + decodes); LoRAX's max_batch_prefill_tokens
    max_running: int  # sequences in the running batch at once
    max_slot_wait_steps: int = 32  # steps a request may wait for its adapter before the device is drained for it


class AdapterGate(Protocol):
    """Puts a request's adapter on the device for it; False while there is no room."""

    def try_acquire(self, request: Request) -> bool: ...


class Scheduler:
    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager, adapters: AdapterGate | None = None) -> None:
        if limits.max_batch_tokens < 1 or limits.max_running < 1:
            raise ValueError(f"scheduler limits must be >= 1, got {limits}")
        self.limits = limits
        self.blocks = block_manager
        self.adapters = adapters
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.limits.max_batch_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._make_room(request, num_tokens, output):
                break  # `request` itself was preempted: everything after it already was too
            output.chunks.append(ScheduledChunk(request, num_tokens))
            budget -= num_tokens
            index += 1
        if not output.preempted:
            self._admit_waiting(output, budget)
        return output

    def _make_room(self, request: Request, num_tokens: int, output: SchedulerOutput) -> bool:
        """Free blocks by preempting the newest running requests until `request` fits.

        The victims all come after `request` in the running order (those before it are already scheduled), so a
        scheduled chunk never loses its blocks; at worst `request` preempts itself.
        """
        while not self.blocks.try_allocate(request, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, output: SchedulerOutput, budget: int) -> None:
        passed_over: list[Request] = []
        draining = False  # a request starves for its adapter: hold back every later one that needs room too
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_running:
            request = self.waiting[0]
            needs_slot = self.adapters is not None and request.adapter is not None and request.adapter_slot < 0
            if needs_slot and (draining or not self.adapters.try_acquire(request)):
                if not draining:
                    request.slot_wait_steps += 1
                    draining = request.slot_wait_steps >= self.limits.max_slot_wait_steps
                passed_over.append(self.waiting.popleft())
                continue
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.blocks.try_allocate(request, num_tokens):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            output.chunks.append(ScheduledChunk(request, num_tokens))
            budget -= num_tokens
        self.waiting.extendleft(reversed(passed_over))

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request from whichever queue holds it and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request)
        request.status = RequestStatus.FINISHED
