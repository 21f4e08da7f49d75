"""Async load client: replays a trace against an OpenAI-compatible `/v1/completions` endpoint, each request sent at
its arrival time whatever the server's backlog (open loop), streamed so the first token's time is seen."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from benchmarks.serving.workload import TimedRequest


@dataclass
class RequestResult:
    index: int
    adapter: int | None
    ok: bool
    error: str = ""
    ttft_s: float = float("nan")  # arrival to first generated token
    e2e_s: float = float("nan")  # arrival to last token
    output_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first one."""
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else float("nan")


def progress(done: int, total: int, started: float) -> None:
    sys.stderr.write(f"\r  {done}/{total} done, {time.monotonic() - started:.0f} s")
    sys.stderr.flush()


async def _send(session: aiohttp.ClientSession, url: str, body: dict, request: TimedRequest,
                start: float) -> RequestResult:
    await asyncio.sleep(max(0.0, start + request.arrival_s - time.monotonic()))
    sent = time.monotonic()
    first = last = None
    chunks = 0
    usage: dict = {}
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                return RequestResult(request.index, request.adapter, False, f"HTTP {response.status}: "
                                     f"{(await response.text())[:300]}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                usage = event.get("usage") or usage
                if any(choice.get("text") for choice in event.get("choices", [])):
                    last = time.monotonic()
                    first = first or last
                    chunks += 1
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
        return RequestResult(request.index, request.adapter, False, f"{type(error).__name__}: {error}")
    if first is None:
        return RequestResult(request.index, request.adapter, False, "no token streamed")
    return RequestResult(request.index, request.adapter, True, "", first - sent, last - sent,
                         usage.get("completion_tokens", chunks), usage.get("prompt_tokens", 0))


async def _run(base_url: str, requests: list[TimedRequest], body_for: Callable[[TimedRequest], dict],
               deadline_s: float) -> list[RequestResult]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        tasks = [asyncio.create_task(_send(session, base_url + "/v1/completions", body_for(r), r, start))
                 for r in requests]
        done = 0
        for finished in asyncio.as_completed(tasks, timeout=deadline_s):
            try:
                await finished
            except asyncio.TimeoutError:
                break
            done += 1
            progress(done, len(requests), start)
        sys.stderr.write("\n")
        late = [task for task in tasks if not task.done()]
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        return [task.result() if not task.cancelled() else
                RequestResult(request.index, request.adapter, False, f"not done after {deadline_s:.0f} s")
                for task, request in zip(tasks, requests)]


def completion_body(request: TimedRequest, model: str, **extra: object) -> dict:
    """Greedy, EOS ignored, exactly `output_tokens` tokens, usage in the last chunk."""
    return {"model": model, "prompt": request.prompt, "max_tokens": request.output_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **extra}


def run_trace(base_url: str, requests: list[TimedRequest], body_for: Callable[[TimedRequest], dict],
              deadline_s: float) -> tuple[list[RequestResult], float]:
    """Per-request results and the wall time from the first arrival to the last answer."""
    started = time.monotonic()
    results = asyncio.run(_run(base_url, requests, body_for, deadline_s))
    return results, time.monotonic() - started
