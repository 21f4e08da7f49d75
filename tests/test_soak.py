"""A soak on loopback: 2000 requests from concurrent clients over more adapters than the server's adapter memory holds
(both tiers evict), mixed across the LoRAX and OpenAI routes, plain and streamed, with clients that disconnect at
random, broken adapters, constrained (JSON-schema and regex) requests and requests whose deadline is too short.

Every accepted request must end with its text or an explicit error (a status with a JSON body, or an error event
that ends its stream cleanly); afterwards nothing runs or waits, every KV block is free, no adapter is pinned, the
server has the threads it had after the first quarter, and its RSS grew by less than RSS_GROWTH_BOUND from the end
of the first quarter to the end of the last."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file
from server_process import server_process
from server_state import sse_data, wait_until_idle
from tiny_models import save_random_adapter, save_tiny_chat_model

REQUESTS = 2000
CONCURRENCY = 24
ADAPTERS = 24  # about 29 KB each: the host tier holds 10 of them, the device tier 6
HOST_BYTES, DEVICE_BYTES = 300_000, 180_000
RSS_GROWTH_BOUND = 32 << 20  # bytes, end of the first quarter to the end of the last
TIME_BOUND = 240.0  # seconds for the whole soak, server start excluded
ANYIO_IDLE_SECONDS = 10  # anyio's WorkerThread.MAX_IDLE_TIME
# asyncio's default executor (tokenizing, templates) starts threads only as bursts need them, up to this many, and
# keeps them: one the first quarter's bursts did not need may start later without leaking anything. A leak per
# request or per adapter load (both in the hundreds here) is far above it.
EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name"]}
MESSAGES = [{"role": "user", "content": "Tell me about adapters."}]
WEIGHTS = "adapter_model.safetensors"


def _fleet(base_dir: Path, root: Path) -> tuple[list[Path], list[Path]]:
    """ADAPTERS good adapters (one PEFT adapter's layout, each with its own seeded weights) and three broken ones:
    truncated weights, an inf in B, a folder that does not exist."""
    template = save_random_adapter(base_dir, root / "template", seed=0, r=8, lora_alpha=16,
                                   target_modules=["q_proj", "v_proj"])
    tensors = load_file(template / WEIGHTS)
    good = []
    for index in range(ADAPTERS):
        folder = shutil.copytree(template, root / f"adapter-{index:02d}")
        generator = torch.Generator().manual_seed(index + 1)
        save_file({name: torch.randn(t.shape, generator=generator) * 0.2 for name, t in tensors.items()},
                  folder / WEIGHTS)
        good.append(folder)
    truncated = shutil.copytree(template, root / "broken-truncated")
    (truncated / WEIGHTS).write_bytes((template / WEIGHTS).read_bytes()[:300])
    infinite = shutil.copytree(template, root / "broken-inf")
    poisoned = {name: t.clone() for name, t in tensors.items()}
    next(t for name, t in poisoned.items() if "lora_B" in name)[0, 0] = float("inf")
    save_file(poisoned, infinite / WEIGHTS)
    return good, [truncated, infinite, root / "broken-missing"]


def _proc_status(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"threads": int(fields["Threads"]), "rss": int(fields["VmRSS"].split()[0]) * 1024}


async def _settled_status(pid: int, threads_at_most: int | None = None) -> dict[str, int]:
    """The process's threads and RSS once idle workers are gone (at once if it has no more than `threads_at_most`):
    anyio (under Starlette) ends a worker thread after ANYIO_IDLE_SECONDS without work; asyncio's default executor
    keeps its threads (see EXECUTOR_THREADS)."""
    settled = time.monotonic() + ANYIO_IDLE_SECONDS + 1
    status = _proc_status(pid)
    while time.monotonic() < settled and (threads_at_most is None or status["threads"] > threads_at_most):
        await asyncio.sleep(0.5)
        status = _proc_status(pid)
    return status


class Soak:
    """The request mix, and the check of each outcome. Each request is drawn from a seeded generator by its index,
    so a failure names a request that can be replayed."""

    def __init__(self, url: str, good: list[Path], broken: list[Path]) -> None:
        self.url = url
        self.good = good
        self.broken = broken
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[str] = []

    async def run(self, client: httpx.AsyncClient, indices: range) -> None:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(index: int) -> None:
            async with gate:
                await self._request(client, index)

        await asyncio.gather(*(one(index) for index in indices))

    async def _request(self, client: httpx.AsyncClient, index: int) -> None:
        rng = random.Random(index)
        kind = rng.choices(["lorax", "lorax_stream", "completion", "chat", "constrained", "broken", "deadline"],
                           weights=[30, 22, 14, 10, 10, 6, 8])[0]
        adapter = rng.choice(self.good) if rng.random() < 0.85 else None
        shape = kind
        if kind == "broken":  # on any route, plain or streamed
            adapter, shape = rng.choice(self.broken), rng.choice(["lorax", "lorax_stream", "completion", "chat"])
        route, body, stream = self._body(shape, adapter, rng)
        work = asyncio.ensure_future(self._send(client, route, body, stream))
        if rng.random() < 0.1:  # the client leaves, at a random moment
            await asyncio.sleep(rng.uniform(0.0, 0.15))
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                self.outcomes["disconnected"] += 1
                return
        try:
            status, payload = await work
        except httpx.HTTPError as error:
            self.unexpected.append(f"request {index} ({kind} {route}): {type(error).__name__}: {error}")
            return
        verdict = self._verdict(kind, route, stream, status, payload)
        if verdict is None:
            self.unexpected.append(f"request {index} ({kind} {route}): {status} {str(payload)[-400:]}")
        else:
            self.outcomes[verdict] += 1

    def _body(self, kind: str, adapter: Path | None, rng: random.Random) -> tuple[str, dict, bool]:
        tokens = rng.randint(1, 8)
        prompt = rng.choice(["Paris is", "Once upon a time", "def add(a, b):", "The quick brown fox"])
        lorax = {"adapter_id": str(adapter), "adapter_source": "local"} if adapter is not None else {}
        openai = {"model": str(adapter), "adapter_source": "local"} if adapter is not None else {}
        if kind == "constrained":
            form = ({"type": "json_schema", "schema": SCHEMA} if rng.random() < 0.5
                    else {"type": "regex", "pattern": "[a-z]{2,6}( [a-z]{2,6})*"})
            if rng.random() < 0.5:
                return "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": tokens,
                                                                     "response_format": form, **lorax}}, False
            return "/v1/completions", {"prompt": prompt, "max_tokens": tokens, "response_format": form,
                                       **openai}, False
        if kind == "completion":
            stream = rng.random() < 0.5
            return "/v1/completions", {"prompt": prompt, "max_tokens": tokens, "stream": stream, **openai}, stream
        if kind == "chat":
            stream = rng.random() < 0.5
            return "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": tokens, "stream": stream,
                                            **openai}, stream
        parameters = {"max_new_tokens": tokens, "details": rng.random() < 0.3, **lorax}
        if kind == "deadline":
            parameters |= {"request_timeout": 0.02, "max_new_tokens": 60, "ignore_eos_token": True}
        stream = kind == "lorax_stream" or (kind == "deadline" and rng.random() < 0.5)
        return ("/generate_stream" if stream else "/generate"), {"inputs": prompt, "parameters": parameters}, stream

    async def _send(self, client: httpx.AsyncClient, route: str, body: dict, stream: bool) -> tuple[int, object]:
        if not stream:
            response = await client.post(route, json=body)
            return response.status_code, response.json()
        async with client.stream("POST", route, json=body) as response:
            raw = await response.aread()  # a stream cut short raises here
        return response.status_code, sse_data(raw) if response.status_code == 200 else json.loads(raw)

    @staticmethod
    def _verdict(kind: str, route: str, stream: bool, status: int, payload: object) -> str | None:
        """The outcome's name if it is one this request may end with, else None."""
        if status != 200:
            error = payload.get("error") if isinstance(payload, dict) else None
            if kind == "broken" and (status == 424 or (status == 404 and route.startswith("/v1/"))) and error:
                return f"broken adapter: {status}"
            if kind == "deadline" and status == 504 and error:
                return "deadline: 504"
            return None
        if not stream:
            if isinstance(payload, dict) and ("generated_text" in payload or payload.get("choices")):
                return "text"
            return None
        if not payload:
            return None
        if route == "/generate_stream":
            last = payload[-1]
            if "details" in last and last.get("generated_text") is not None:
                return "stream: text"
            if last.get("error_type") == "timeout" and kind == "deadline":
                return "deadline: error event"
            if kind == "broken" and last.get("error"):
                return "broken adapter: error event"
            return None
        if payload[-1] != "[DONE]":
            return None
        if kind == "broken" and any(isinstance(e, dict) and "error" in e for e in payload):
            return "broken adapter: error event"
        finished = any(isinstance(e, dict) and any(c.get("finish_reason") for c in e.get("choices", []))
                       for e in payload)
        return "stream: text" if finished else None


def _counter(url: str, name: str) -> float:
    with httpx.Client() as client:
        text = client.get(url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == name for s in f.samples)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("soak")
    base_dir = save_tiny_chat_model(root / "base")
    good, broken = _fleet(base_dir, root / "adapters")
    return base_dir, good, broken


def test_soak_ends_every_request_and_leaks_nothing(fleet, tmp_path: Path) -> None:
    base_dir, good, broken = fleet
    args = ["--model-id", str(base_dir), "--dtype", "float32", "--device", "cpu", "--max-input-length", "64",
            "--max-total-tokens", "256", "--adapter-memory", str(HOST_BYTES),
            "--adapter-device-memory", str(DEVICE_BYTES)]
    with server_process(args, tmp_path / "server.log", env={"HF_HUB_OFFLINE": "1"}) as (url, process):
        soak = Soak(url, good, broken)
        quarter = REQUESTS // 4

        async def drive() -> tuple[dict[str, int], dict[str, int], float]:
            limits = httpx.Limits(max_connections=CONCURRENCY * 2, max_keepalive_connections=CONCURRENCY)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
                started = time.monotonic()
                await soak.run(client, range(quarter))
                elapsed = time.monotonic() - started  # of the requests only, not of the waits between
                await asyncio.to_thread(wait_until_idle, url)
                first = await _settled_status(process.pid)
                started = time.monotonic()
                await soak.run(client, range(quarter, REQUESTS))
                elapsed += time.monotonic() - started
            await asyncio.to_thread(wait_until_idle, url)
            return first, await _settled_status(process.pid, first["threads"]), elapsed

        first, last, elapsed = asyncio.run(drive())
        assert not soak.unexpected, "\n".join(soak.unexpected[:10])
        assert sum(soak.outcomes.values()) == REQUESTS
        assert soak.outcomes["text"] + soak.outcomes["stream: text"] > REQUESTS // 2, soak.outcomes
        for outcome in ("disconnected", "broken adapter: 424", "deadline: 504"):
            assert soak.outcomes[outcome] > 0, soak.outcomes  # the mix really held each kind
        # more adapters than either tier holds: both evicted all along
        assert _counter(url, "loraserve:adapter_host_evictions") > ADAPTERS
        assert _counter(url, "loraserve:adapter_device_evictions") > ADAPTERS
        with httpx.Client() as client:
            listed = client.get(url + "/adapters").json()["adapters"]
        assert not [a for a in listed if a["requests"]], listed  # no device adapter serves anyone
        growth = last["rss"] - first["rss"]
        print(f"\nsoak: {REQUESTS} requests in {elapsed:.1f} s; outcomes {dict(soak.outcomes)}; "
              f"threads {first['threads']} -> {last['threads']}; RSS {first['rss'] / 2**20:.1f} -> "
              f"{last['rss'] / 2**20:.1f} MiB ({growth / 2**20:+.1f} MiB)")
        assert last["threads"] <= first["threads"] + EXECUTOR_THREADS, (first, last)
        assert growth < RSS_GROWTH_BOUND, (first, last)
        assert elapsed < TIME_BOUND
