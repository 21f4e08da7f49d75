"""The scheduler and block manager on synthetic requests, without a model.

A small simulator stands in for the runner: each scheduled chunk advances `num_computed_tokens`, and a chunk that
completes its sequence appends a token. Invariants are checked after every step.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from loraserve.engine.block_manager import BlockManager
from loraserve.engine.contracts import SchedulerOutput
from loraserve.engine.request import AdapterPin, AdapterRef, Request, RequestStatus
from loraserve.engine.scheduler import Scheduler, SchedulerLimits
from loraserve.sampling.params import SamplingParams


def make_request(request_id: str, prompt_len: int, max_new_tokens: int) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(range(1, prompt_len + 1)),
        params=SamplingParams(max_new_tokens=max_new_tokens),
        max_total_tokens=10_000,
    )


def apply_step(scheduler: Scheduler, output: SchedulerOutput) -> list[Request]:
    """Advance like the engine core would; returns the requests that finished."""
    finished = []
    for chunk in output.chunks:
        request = chunk.request
        samples = chunk.completes_sequence
        request.num_computed_tokens += chunk.num_tokens
        if samples:
            request.output_token_ids.append(1000 + len(request.output_token_ids))
            if len(request.output_token_ids) >= request.params.max_new_tokens:
                scheduler.finish(request)
                finished.append(request)
    return finished


def check_invariants(scheduler: Scheduler, output: SchedulerOutput) -> None:
    blocks = scheduler.blocks
    held = [b for r in scheduler.running for b in r.block_ids]
    assert len(held) == len(set(held)), "a KV block is owned twice"
    assert len(held) + blocks.num_free_blocks == blocks.num_blocks, "a KV block leaked"
    for request in scheduler.waiting:
        assert request.block_ids == [] and request.status is RequestStatus.WAITING
    assert output.num_tokens <= scheduler.limits.max_batch_tokens
    assert len(scheduler.running) <= scheduler.limits.max_running
    for chunk in output.chunks:
        request = chunk.request
        assert chunk.num_tokens >= 1
        assert len(request.block_ids) * blocks.block_size >= request.num_computed_tokens + chunk.num_tokens


def run_to_completion(scheduler: Scheduler, requests: list[Request], max_steps: int = 10_000) -> int:
    for request in requests:
        scheduler.add(request)
    steps = 0
    while scheduler.has_work():
        output = scheduler.schedule()
        check_invariants(scheduler, output)
        assert output.chunks, "the scheduler stalled with work left"
        apply_step(scheduler, output)
        steps += 1
        assert steps < max_steps
    return steps


def test_chunked_prefill_respects_the_token_budget() -> None:
    scheduler = Scheduler(SchedulerLimits(max_batch_tokens=32, max_running=8), BlockManager(64, 4))
    for i, length in enumerate([10, 20, 30]):
        scheduler.add(make_request(f"r{i}", length, 4))
    first = scheduler.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in first.chunks] == [("r0", 10), ("r1", 20), ("r2", 2)]
    assert [c.completes_sequence for c in first.chunks] == [True, True, False]
    apply_step(scheduler, first)
    second = scheduler.schedule()
    # decodes of r0 and r1 first, then the rest of r2's prompt
    assert [(c.request.request_id, c.num_tokens) for c in second.chunks] == [("r0", 1), ("r1", 1), ("r2", 28)]


def test_requests_join_while_others_decode() -> None:
    scheduler = Scheduler(SchedulerLimits(max_batch_tokens=64, max_running=8), BlockManager(64, 4))
    early = make_request("early", 5, 10)
    scheduler.add(early)
    apply_step(scheduler, scheduler.schedule())
    late = make_request("late", 7, 3)
    scheduler.add(late)
    output = scheduler.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in output.chunks] == [("early", 1), ("late", 7)]


def test_all_blocks_return_when_everything_finishes() -> None:
    blocks = BlockManager(40, 4)
    scheduler = Scheduler(SchedulerLimits(max_batch_tokens=16, max_running=4), blocks)
    requests = [make_request(f"r{i}", 3 + 5 * i, 2 + i) for i in range(6)]
    run_to_completion(scheduler, requests)
    assert blocks.num_free_blocks == blocks.num_blocks
    assert [len(r.output_token_ids) for r in requests] == [2 + i for i in range(6)]


def test_preemption_recomputes_and_loses_nothing() -> None:
    # 10 blocks of 4 = 40 tokens of KV for 4 requests that need up to 24 tokens each: preemption must happen.
    blocks = BlockManager(10, 4)
    scheduler = Scheduler(SchedulerLimits(max_batch_tokens=64, max_running=8), blocks)
    requests = [make_request(f"r{i}", 8, 16) for i in range(4)]
    run_to_completion(scheduler, requests)
    assert scheduler.num_preemptions > 0
    assert sum(r.num_preemptions for r in requests) == scheduler.num_preemptions
    for request in requests:
        assert request.output_token_ids == [1000 + i for i in range(16)]
    assert blocks.num_free_blocks == blocks.num_blocks


def test_preempted_request_resumes_before_newer_ones() -> None:
    blocks = BlockManager(4, 4)
    scheduler = Scheduler(SchedulerLimits(max_batch_tokens=64, max_running=8), blocks)
    first, second = make_request("first", 7, 20), make_request("second", 7, 20)
    scheduler.add(first)
    scheduler.add(second)
    preempted = []
    while not preempted:
        output = scheduler.schedule()
        apply_step(scheduler, output)
        preempted = output.preempted
    assert preempted == [second]
    assert scheduler.waiting[0] is second and second.num_computed_tokens == 0 and second.block_ids == []


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_keep_invariants(seed: int) -> None:
    rng = random.Random(seed)
    blocks = BlockManager(rng.randint(12, 40), rng.choice([2, 4, 8]))
    capacity = blocks.num_blocks * blocks.block_size
    scheduler = Scheduler(SchedulerLimits(rng.randint(8, 48), rng.randint(1, 6)), blocks)
    requests = []
    for i in range(20):
        prompt = rng.randint(1, capacity // 2)
        requests.append(make_request(f"r{i}", prompt, rng.randint(1, capacity - prompt)))
    pending = list(requests)
    steps = 0
    while pending or scheduler.has_work():
        if pending and rng.random() < 0.5:
            scheduler.add(pending.pop(0))
        if not scheduler.has_work():
            continue
        output = scheduler.schedule()
        check_invariants(scheduler, output)
        assert output.chunks
        apply_step(scheduler, output)
        steps += 1
        assert steps < 50_000
    for request in requests:
        assert len(request.output_token_ids) == request.params.max_new_tokens
    assert blocks.num_free_blocks == blocks.num_blocks


class _SlotGate:
    """A stand-in for the adapter residency: room for `capacity` adapters, an idle one evicted for a new adapter."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.users: Counter[str] = Counter()

    def try_acquire(self, request: Request) -> bool:
        name = request.adapter.adapter_id
        if name not in self.users:
            idle = [adapter for adapter, count in self.users.items() if count == 0]
            if len(self.users) >= self.capacity and not idle:
                return False
            if len(self.users) >= self.capacity:
                del self.users[idle[0]]
            self.users[name] = 0
        self.users[name] += 1
        request.adapter_pin = AdapterPin(None, slot=0)  # type: ignore[arg-type] - no host entry without a model
        return True


@pytest.mark.parametrize("max_wait", [8, 10_000])
def test_an_adapter_waiting_for_a_slot_is_served_within_the_bound(max_wait: int) -> None:
    """Two slots kept busy by a steady stream for adapters a and b; one request for c arrives at step 3."""
    gate = _SlotGate(capacity=2)
    scheduler = Scheduler(SchedulerLimits(64, 16, max_slot_wait_steps=max_wait), BlockManager(1024, 4), gate)
    starving = dataclasses.replace(make_request("c", 4, 6), adapter=AdapterRef("c"))
    admitted_at = None
    for step in range(200):
        scheduler.add(dataclasses.replace(make_request(f"r{step}", 4, 6), adapter=AdapterRef("ab"[step % 2])))
        if step == 3:
            scheduler.add(starving)
        output = scheduler.schedule()
        check_invariants(scheduler, output)
        if admitted_at is None and any(chunk.request is starving for chunk in output.chunks):
            admitted_at = step
        for request in apply_step(scheduler, output):
            gate.users[request.adapter.adapter_id] -= 1
    if max_wait == 10_000:
        assert admitted_at is None  # without the bound, a and b hold the slots for ever
    else:
        assert admitted_at is not None and admitted_at - 3 <= max_wait + 6 + 2
