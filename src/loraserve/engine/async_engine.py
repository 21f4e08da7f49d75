"""Asyncio front of the engine: the step loop runs on a thread of its own (the server's main thread, see `run`);
each request gets a queue of outputs.

The event loop never waits on the model, and the step loop never waits on a client. Requests and aborts cross into
the loop thread through one inbox that is drained before every step; outputs cross back with
`call_soon_threadsafe`. A consumer that stops iterating (a client that disconnected) aborts its request, which frees
its KV blocks before the next step.

Every request has a deadline: its own `timeout`, capped by `max_request_seconds` (which is also the deadline of a
request without one), counted from its submission. The loop thread checks deadlines before every step: a request
past its deadline is aborted there, whatever its consumer is doing (reading, or stuck writing to a client), and its
consumer gets `DeadlineExceeded` as its next item. Waiting for the adapter is bounded by the deadline too, and by
the download timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

from loraserve.adapters.cache import HostAdapter
from loraserve.adapters.registry import AdapterKey
from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine, RequestOutput
from loraserve.engine.request import AdapterRef, Request
from loraserve.engine.residency import AdapterInfo
from loraserve.engine.stats import EngineInfo, EngineStats
from loraserve.errors import AdapterNotFound, DeadlineExceeded, EngineDead, InvalidRequest
from loraserve.sampling.grammar import GrammarSpec
from loraserve.sampling.params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _Deadline:
    """When a request must be done by: `seconds` after it was submitted."""

    seconds: float
    at: float  # time.monotonic()

    @classmethod
    def after(cls, seconds: float) -> _Deadline:
        return cls(seconds, time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"the request did not finish within {self.seconds:g} s (its request_timeout, at most "
                                "--max-request-seconds); it was aborted")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    deadline: _Deadline

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}  # owned by the loop thread
        self._next_deadline = math.inf  # no stream's deadline is earlier (owned by the loop thread)
        self._stop = False
        self._loop_thread: threading.Thread | None = None  # the thread running the step loop, once it runs

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(Engine.from_config(config))

    def start(self) -> None:
        """Run the step loop in a thread of its own (scripts, tests). A server runs it with `run` on the main thread."""
        threading.Thread(target=self.run, name="loraserve-step-loop", daemon=True).start()
        while self._loop_thread is None:
            time.sleep(0.001)

    def run(self) -> None:
        """Run the step loop on the calling thread until `shutdown`.

        The server calls this on the process's main thread: on this CPU, oneDNN's small bf16 matmuls issued from any
        other thread ran 2-2.5x slower (0.07 -> 0.17 ms for a 32 x 640 x 2048 linear), which cost the whole engine
        about 30% of its throughput (392 -> 272 tok/s at 32 requests).
        """
        self._loop_thread = threading.current_thread()
        # llguidance's tokenizer takes seconds to build for a large vocabulary: build it now, beside the step loop,
        # rather than inside the first constrained request
        threading.Thread(target=self.engine.grammars.prepare, name="loraserve-grammar-prepare", daemon=True).start()
        self._run()

    async def compile_grammar(self, spec: GrammarSpec | None) -> None:
        """Compile a request's grammar off the event loop (milliseconds per new schema, seconds if the tokenizer is
        still being prepared) so that `generate` then finds it cached; raises `InvalidRequest` for a schema the
        grammar engine cannot enforce."""
        if spec is not None:
            await asyncio.to_thread(self.engine.grammars.new_state, spec)

    def shutdown(self) -> None:
        self._stop = True
        self._wakeup.set()
        thread = self._loop_thread
        if thread is not None and thread is not threading.current_thread() and thread.daemon:
            thread.join(timeout=30)  # our own thread; the main thread's `run` returns by itself

    @property
    def is_running(self) -> bool:
        thread = self._loop_thread
        return thread is not None and thread.is_alive() and not self._stop

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        adapter: AdapterRef | None = None, timeout: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Validate now (raising `InvalidRequest` here, before any response is started) and return the stream of the
        request's outputs; iterating it loads the adapter into host memory off the step loop, enqueues the request
        and yields outputs until the last, which has `finished` set, or raises `DeadlineExceeded` once `timeout`
        seconds (at most `max_request_seconds`) have passed. Must be called from the event loop; it tokenizes on it
        (`submit` does not)."""
        deadline = self._deadline(timeout)
        return self._outputs(self._make_request(prompt, params, request_id, adapter), deadline)

    async def submit(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        adapter: AdapterRef | None = None, timeout: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """`generate` with the tokenizing and validation in a worker thread: a long prompt never holds the event
        loop that streams everyone else's tokens (the server's path)."""
        deadline = self._deadline(timeout)
        request = await asyncio.to_thread(self._make_request, prompt, params, request_id, adapter)
        return self._outputs(request, deadline)

    def _deadline(self, timeout: float | None) -> _Deadline:
        limit = self.engine.config.max_request_seconds
        if timeout is None:
            return _Deadline.after(limit)
        if not timeout > 0:  # NaN too
            raise InvalidRequest(f"`request_timeout` must be a positive number of seconds, got {timeout}")
        return _Deadline.after(min(timeout, limit))

    def _make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None,
                      adapter: AdapterRef | None) -> Request:
        if not self.is_running:
            raise EngineDead("the engine's step loop is not running")
        return self.engine.make_request(prompt, params, request_id, adapter)

    async def _outputs(self, request: Request, deadline: _Deadline) -> AsyncIterator[RequestOutput]:
        adapter = None
        if request.adapter is not None:
            # Off the step loop: other requests keep decoding while this adapter is read or downloaded. It is pinned
            # when the loop adds the request, so a client gone meanwhile leaves no pin behind.
            adapter = await self._prepare(request.adapter, deadline)
            request.timings.adapter_ready = time.monotonic()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), deadline)
        self._send("add", (request, stream, adapter))
        request_id = request.request_id
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    async def run_between_steps(self, function: Callable[[], T]) -> T:
        """`function()` on the loop thread between two steps: the only safe moment to read or change the engine's
        state (LoRA slots, queues) from outside the loop."""
        if not self.is_running:
            raise EngineDead("the engine's step loop is not running")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._send("call", (function, future))
        return await asyncio.wrap_future(future)

    # -- the facade the server reads ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def lent_token(self, always: bool = False) -> str | None:
        """The server's own Hub token, for adapter downloads of requests that bring none, where the operator lends
        it (LORAX_USE_GLOBAL_HF_TOKEN, or `always`: callers authenticated by API keys); else None."""
        config = self.engine.config
        return config.hf_token if always or config.adapter_uses_server_token else None

    def info(self) -> EngineInfo:
        return self.engine.info()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def adapter_chat_template(self, ref: AdapterRef) -> str | None:
        """The chat template the adapter ships, if any (loading the adapter into host memory, off the loop)."""
        return (await self._prepare(ref)).adapter.chat_template

    async def preload_adapter(self, ref: AdapterRef) -> bool:
        """Load the adapter into host memory (off the loop), then onto the device; False if it had no room."""
        entry = await self._prepare(ref)
        return await self.run_between_steps(lambda: self.engine.adapters.activate(entry))

    async def load_adapter(self, name: str, ref: AdapterRef, replace: bool = False) -> HostAdapter:
        """Register `name` for the adapter at `ref` and load it now (vLLM's `/v1/load_lora_adapter`); a failed
        load leaves the name unregistered. `replace` re-reads a registered name (its new files, a new version)."""
        residency = self.engine.adapters
        residency.require_enabled()
        key = AdapterKey(ref.source, ref.adapter_id)
        previous = residency.names.lookup(name)
        residency.names.register(name, key, replace=replace)
        try:
            entry = await self._prepare(AdapterRef(name, ref.source, ref.token))
        except BaseException:
            if previous is None:
                residency.names.unregister(name)
            else:
                residency.names.register(name, previous, replace=True)
            raise
        await self.run_between_steps(lambda: residency.activate(entry))
        return entry

    async def _prepare(self, ref: AdapterRef, deadline: _Deadline | None = None) -> HostAdapter:
        """The adapter made host-resident, waited for at most the download timeout (and `deadline`). The reading or
        downloading runs on the cache's own threads and is awaited here, so a stalled download holds no worker
        thread that tokenizing or other adapters need."""
        residency = self.engine.adapters
        loading = await asyncio.to_thread(residency.fetch, ref)  # a local folder's files are stat'ed
        wait = residency.limits.download_timeout
        deadline_first = deadline is not None and deadline.remaining() < wait
        if deadline_first:
            wait = deadline.remaining()
        try:
            entry = await asyncio.wait_for(asyncio.wrap_future(loading), max(wait, 0.0))
        except TimeoutError:
            raise (deadline.exceeded() if deadline_first else residency.download_timed_out(ref)) from None
        return residency.checked(ref, entry)

    async def unload_adapter(self, ref: AdapterRef) -> AdapterKey:
        """Free the adapter's device and host memory and forget its name (`ref.adapter_id` may be a name or an id at
        `ref.source`); raises `AdapterInUse` while requests use it and `AdapterNotFound` if nothing held it."""
        residency = self.engine.adapters
        residency.require_enabled()
        key = residency.key_of(ref)
        unloaded = await self.run_between_steps(lambda: residency.unload(key))
        forgotten = residency.names.unregister(ref.adapter_id) is not None
        if not unloaded and not forgotten:
            raise AdapterNotFound(f"adapter {ref.adapter_id!r} is not loaded")
        return key

    async def resident_adapters(self) -> list[AdapterInfo]:
        """The device and host tiers, snapshotted between steps (cheap: no disk access)."""
        residency = self.engine.adapters
        return await self.run_between_steps(residency.resident) if residency.enabled else []

    async def list_adapters(self) -> list[AdapterInfo]:
        """Every adapter this server knows at its highest tier: the device and host tiers snapshotted between steps,
        the disk cache scanned in a worker thread (never on the step loop)."""
        residency = self.engine.adapters
        if not residency.enabled:
            return []
        on_disk = await asyncio.to_thread(residency.on_disk)
        resident = await self.resident_adapters()
        known = {(info.source, info.adapter_id): info for info in on_disk}
        known.update({(info.source, info.adapter_id): info for info in resident})
        for name, key in residency.names.items():
            if (key.source, key.adapter_id) not in known:
                known[(key.source, key.adapter_id)] = AdapterInfo(key.adapter_id, key.source, "registered",
                                                                  names=(name,))
        return list(known.values())

    def _send(self, kind: str, payload: object) -> None:
        self._inbox.put((kind, payload))
        self._wakeup.set()

    # -- the loop thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            self._drain_inbox()
            self._expire()
            if not self.engine.has_work():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # noqa: BLE001 - one bad step must not take the server down
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(error)
                continue
            for output in outputs:
                self._deliver(output)
        self._fail_all(EngineDead("the engine is shutting down"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request, stream, adapter = payload  # type: ignore[misc]
                self._add(request, stream, adapter)
            elif kind == "call":
                function, future = payload  # type: ignore[misc]
                try:
                    future.set_result(function())
                except Exception as error:  # noqa: BLE001 - raised to the awaiting caller
                    future.set_exception(error)
            else:
                output = self.engine.abort(payload)  # type: ignore[arg-type]
                if output is not None:
                    self._deliver(output)

    def _add(self, request: Request, stream: _Stream, adapter: HostAdapter | None) -> None:
        try:
            self.engine.add(request, adapter)
        except Exception as error:  # noqa: BLE001 - reported to the caller that sent the request
            stream.put(error)
            return
        self._streams[request.request_id] = stream
        self._next_deadline = min(self._next_deadline, stream.deadline.at)

    def _expire(self) -> None:
        """Abort every request past its deadline (its KV blocks and adapter pin freed before the next step) and hand
        its consumer the error. Scans only once the earliest deadline seen may have passed."""
        now = time.monotonic()
        if now < self._next_deadline:
            return
        upcoming = math.inf
        for request_id, stream in list(self._streams.items()):
            if stream.deadline.at <= now:
                del self._streams[request_id]
                self.engine.abort(request_id)
                stream.put(stream.deadline.exceeded())
            else:
                upcoming = min(upcoming, stream.deadline.at)
        self._next_deadline = upcoming

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            del self._streams[output.request_id]
        stream.put(output)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(error)
        self._streams.clear()
