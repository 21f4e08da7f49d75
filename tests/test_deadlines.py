"""Deadlines: a request past its `request_timeout` (at most --max-request-seconds, the default of requests without
one) is aborted in the engine, with its KV blocks and adapter pin freed, and its client is told: 504 with a JSON
error, or an error event that ends the stream cleanly. A client that reads nothing is cut off after
--stream-idle-timeout and its request freed. On the async engine in-process, and over HTTP on a real server."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from server_process import post_json, running_server
from server_state import engine_gauges, read_stream, wait_until_idle
from tiny_models import save_random_adapter, save_tiny_chat_model, tiny_config

from loraserve.config import EngineConfig
from loraserve.engine.api import AdapterRef, AsyncEngine, RequestOutput, collect
from loraserve.engine.engine import Engine
from loraserve.errors import DeadlineExceeded, InvalidRequest
from loraserve.sampling.params import SamplingParams

LONG = SamplingParams(max_new_tokens=3000, ignore_eos=True)  # a minute or more here: only an abort ends it in time
SLACK = 5.0  # seconds a loaded 2-core machine may take past a deadline to notice it


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("deadlines")
    config = tiny_config("gemma3")
    config.max_position_embeddings = 4096
    base_dir = save_tiny_chat_model(root / "base", config)
    adapter = save_random_adapter(base_dir, root / "adapter", seed=1, r=4, lora_alpha=8,
                                  target_modules=["q_proj", "v_proj"])
    return base_dir, adapter


def _engine(base_dir: Path, **config: object) -> AsyncEngine:
    engine = AsyncEngine(Engine.from_config(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu",
                                                         max_input_length=64, max_total_tokens=4096, **config)))
    engine.start()
    return engine


async def _drain(outputs: AsyncIterator[RequestOutput]) -> tuple[int, BaseException | None]:
    """Tokens received before the stream ended, and the error it ended with (None: it finished)."""
    received = 0
    try:
        async for output in outputs:
            received += len(output.tokens)
    except DeadlineExceeded as error:
        return received, error
    return received, None


async def _idle(engine: AsyncEngine) -> None:
    stats = await engine.run_between_steps(engine.stats)
    assert (stats.num_running, stats.num_waiting) == (0, 0), stats
    assert stats.num_free_kv_blocks == stats.num_kv_blocks, stats
    assert stats.adapters.host_pins == 0, stats


def test_a_running_request_past_its_deadline_is_aborted_and_frees_its_blocks_and_adapter(model) -> None:
    base_dir, adapter = model
    engine = _engine(base_dir)

    async def scenario() -> None:
        started = time.monotonic()
        doomed = engine.generate("Once upon a time", LONG, adapter=AdapterRef(str(adapter), "local"), timeout=1.0)
        neighbour = collect(engine.generate("Paris is", SamplingParams(max_new_tokens=30, ignore_eos=True)))
        (received, error), finished = await asyncio.gather(_drain(doomed), neighbour)
        elapsed = time.monotonic() - started
        assert isinstance(error, DeadlineExceeded) and "within 1 s" in str(error)
        assert 0 < received < LONG.max_new_tokens  # it was generating when its time ran out
        assert 1.0 <= elapsed < 1.0 + SLACK
        assert len(finished.tokens) == 30  # the request beside it ran to its end
        await _idle(engine)

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()


def test_a_queued_request_past_its_deadline_leaves_the_queue(model) -> None:
    base_dir, _ = model
    engine = _engine(base_dir, max_running_requests=1)

    async def scenario() -> None:
        hog = engine.generate("Once upon a time", LONG)  # holds the only running place
        await anext(hog)
        received, error = await _drain(engine.generate("Paris is", SamplingParams(max_new_tokens=4), timeout=0.5))
        assert received == 0 and isinstance(error, DeadlineExceeded)
        stats = await engine.run_between_steps(engine.stats)
        assert (stats.num_running, stats.num_waiting) == (1, 0)
        await hog.aclose()
        await _idle(engine)

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()


def test_max_request_seconds_caps_every_deadline_and_bad_timeouts_are_refused(model) -> None:
    base_dir, _ = model
    engine = _engine(base_dir, max_request_seconds=1.0)

    async def scenario() -> None:
        for timeout in (None, 1000.0):  # no deadline of its own, and one past the cap
            started = time.monotonic()
            _, error = await _drain(engine.generate("Once upon a time", LONG, timeout=timeout))
            assert isinstance(error, DeadlineExceeded) and "within 1 s" in str(error)
            assert 1.0 <= time.monotonic() - started < 1.0 + SLACK
        for bad in (0.0, -1.0, math.nan):
            with pytest.raises(InvalidRequest, match="request_timeout"):
                engine.generate("x", LONG, timeout=bad)
        await _idle(engine)

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()


# --- over HTTP -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base_dir, _ = model
    args = ["--model-id", str(base_dir), "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096",
            "--max-input-length", "256", "--max-concurrent-requests", "1", "--stream-idle-timeout", "2"]
    with running_server(args, tmp_path_factory.mktemp("deadline-server") / "server.log") as url:
        yield url


def _lorax(adapter: Path | None, **parameters: object) -> dict:
    chosen = {"adapter_id": str(adapter), "adapter_source": "local"} if adapter is not None else {}
    return {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3000, "ignore_eos_token": True,
                                                        **chosen, **parameters}}


def _openai(adapter: Path | None, **fields: object) -> dict:
    chosen = {"model": str(adapter), "adapter_source": "local"} if adapter is not None else {}
    return {"max_tokens": 3000, "ignore_eos": True, **chosen, **fields}


def test_past_its_deadline_a_plain_request_answers_504(server: str, model) -> None:
    _, adapter = model
    started = time.monotonic()
    status, reply = post_json(server + "/generate", _lorax(adapter, request_timeout=1))
    assert status == 504 and reply["error_type"] == "timeout" and "within 1 s" in reply["error"], reply
    assert time.monotonic() - started < 1.0 + SLACK
    wait_until_idle(server)
    status, reply = post_json(server + "/v1/completions", _openai(adapter, prompt="Once", request_timeout=1))
    assert status == 504 and reply["error"]["type"] == "timeout" and reply["error"]["code"] == 504, reply
    wait_until_idle(server)
    status, reply = post_json(server + "/v1/chat/completions",
                              _openai(None, messages=[{"role": "user", "content": "Hi"}], request_timeout=1))
    assert status == 504 and reply["error"]["type"] == "timeout", reply
    wait_until_idle(server)
    status, _ = post_json(server + "/generate", _lorax(adapter, max_new_tokens=3))  # the slot came back
    assert status == 200


def test_past_its_deadline_a_stream_ends_with_an_error_event(server: str, model) -> None:
    _, adapter = model
    status, events = read_stream(server + "/generate_stream", _lorax(adapter, request_timeout=1.5))
    assert status == 200 and len(events) > 1
    assert all("token" in event for event in events[:-1])
    assert events[-1]["error_type"] == "timeout" and "within 1.5 s" in events[-1]["error"], events[-1]
    wait_until_idle(server)
    status, events = read_stream(server + "/v1/chat/completions",
                                 _openai(adapter, messages=[{"role": "user", "content": "Hi"}], stream=True,
                                         request_timeout=1.5))
    assert status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "timeout" and events[-2]["error"]["code"] == 504, events[-2]
    assert any(event.get("choices") for event in events[:-2])  # it streamed tokens before its time ran out
    wait_until_idle(server)


def test_a_request_timeout_must_be_positive(server: str) -> None:
    for bad in (0, -1):
        status, reply = post_json(server + "/generate", _lorax(None, request_timeout=bad, max_new_tokens=2))
        assert status == 422 and "request_timeout" in reply["error"], reply
        status, reply = post_json(server + "/v1/completions", _openai(None, prompt="x", request_timeout=bad))
        assert status == 422 and "request_timeout" in reply["error"]["message"], reply


def test_a_client_that_reads_nothing_is_cut_off_and_its_request_freed(server: str) -> None:
    """16 choices with 20 alternatives each put about 20 KiB on the wire per step: the socket buffers (a few MiB on
    loopback) fill within a few hundred steps of the 2000 asked for, then each write waits on the client."""
    host, port = server.removeprefix("http://").split(":")
    before = engine_gauges(server)["generated_tokens"]
    body = json.dumps(_openai(None, messages=[{"role": "user", "content": "Hi"}], stream=True, n=16, max_tokens=2000,
                              logprobs=True, top_logprobs=20)).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 60
        while engine_gauges(server)["running"] == 0:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.05)
        status, reply = post_json(server + "/generate", _lorax(None, max_new_tokens=2))
        assert status == 429, reply  # --max-concurrent-requests 1: the stalled stream holds the only place
        wait_until_idle(server, timeout=120)  # ended by the idle timeout, not by running to its end
        assert engine_gauges(server)["generated_tokens"] - before < 16 * 2000
        status, _ = post_json(server + "/generate", _lorax(None, max_new_tokens=2))
        assert status == 200  # and its place came back
