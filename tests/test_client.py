"""`loraserve.client` against a real `loraserve serve` on loopback, plus a scripted stdlib HTTP stub for what a real
server cannot be made to do on demand (503s, Retry-After, recording request headers)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from server_process import free_port, post_json, running_server
from tiny_models import save_random_adapter, save_tiny_chat_model

from loraserve.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    Client,
    GenerationError,
    IncompleteGenerationError,
    LoraserveError,
    OverloadedError,
    UnavailableError,
    ValidationError,
)

PROMPT = "Paris is the capital"
MESSAGES = [{"role": "user", "content": "Name a capital."}]
GREEDY = dict(max_new_tokens=8, ignore_eos_token=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("client")
    base_dir = save_tiny_chat_model(root / "base")
    adapter = save_random_adapter(base_dir, root / "adapter", seed=3, r=4, lora_alpha=16,
                                  target_modules=["q_proj", "o_proj", "up_proj"])
    return base_dir, adapter


@pytest.fixture(scope="module")
def server(dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(["--model-id", str(dirs[0]), "--dtype", "float32", "--device", "cpu"], log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[Client]:
    with Client(server, max_retries=0) as client:
        yield client


def _adapter_options(dirs: tuple[Path, Path], with_adapter: bool) -> dict:
    return dict(adapter_id=str(dirs[1]), adapter_source="local") if with_adapter else {}


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_generate_agrees_with_raw_post_sync_and_async(server: str, client: Client, dirs: tuple[Path, Path],
                                                      with_adapter: bool) -> None:
    options = {**GREEDY, **_adapter_options(dirs, with_adapter)}
    status, raw = post_json(server + "/generate", {"inputs": PROMPT, "parameters": {**options, "details": True}})
    assert status == 200
    response = client.generate(PROMPT, **options)

    async def run() -> str:
        async with AsyncClient(server, max_retries=0) as async_client:
            return (await async_client.generate(PROMPT, **options)).generated_text

    assert response.generated_text == raw["generated_text"] == asyncio.run(run())
    assert [t.id for t in response.details.tokens] == [t["id"] for t in raw["details"]["tokens"]]
    assert response.details.finish_reason == "length" and response.details.generated_tokens == 8
    assert response.details.prompt_tokens == raw["details"]["prompt_tokens"]


def test_adapter_changes_the_output(client: Client, dirs: tuple[Path, Path]) -> None:
    base = client.generate(PROMPT, **GREEDY).generated_text
    tuned = client.generate(PROMPT, **GREEDY, **_adapter_options(dirs, True)).generated_text
    assert base != tuned


def test_generate_stream_matches_generate(server: str, client: Client, dirs: tuple[Path, Path]) -> None:
    options = {**GREEDY, **_adapter_options(dirs, True)}
    expected = client.generate(PROMPT, **options)
    events = list(client.generate_stream(PROMPT, **options))
    assert "".join(e.token.text for e in events) == expected.generated_text
    assert [e.token.id for e in events] == [t.id for t in expected.details.tokens]
    assert events[-1].generated_text == expected.generated_text
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 8
    assert all(e.generated_text is None and e.details is None for e in events[:-1])

    async def run() -> list:
        async with AsyncClient(server) as async_client:
            return [e async for e in async_client.generate_stream(PROMPT, **options)]

    assert [e.token.text for e in asyncio.run(run())] == [e.token.text for e in events]


def test_chat_plain_and_streamed_agree(server: str, client: Client) -> None:
    options = dict(max_tokens=8, temperature=0, ignore_eos=True)
    reply = client.chat(MESSAGES, **options)
    text = reply["choices"][0]["message"]["content"]
    assert text and reply["choices"][0]["finish_reason"] == "length"
    chunks = list(client.chat(MESSAGES, stream=True, **options))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == text

    async def run() -> tuple[str, str]:
        async with AsyncClient(server) as async_client:
            plain = await async_client.chat(MESSAGES, **options)
            streamed = [c async for c in await async_client.chat(MESSAGES, stream=True, **options)]
        return (plain["choices"][0]["message"]["content"],
                "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed if c["choices"]))

    assert asyncio.run(run()) == (text, text)


def test_errors_map_to_classes_with_the_server_message(server: str, client: Client, tmp_path: Path) -> None:
    status, raw = post_json(server + "/generate", {"inputs": PROMPT, "parameters": {"temperature": -1}})
    assert status == 422
    with pytest.raises(ValidationError) as caught:
        client.generate(PROMPT, temperature=-1)
    assert caught.value.status == 422 and caught.value.message == raw["error"]
    assert caught.value.error_type == "validation"

    missing = dict(adapter_id=str(tmp_path / "no-such-adapter"), adapter_source="local", max_new_tokens=4)
    with pytest.raises(GenerationError) as caught:
        client.generate(PROMPT, **missing)
    assert caught.value.status == 424 and "no-such-adapter" in caught.value.message
    with pytest.raises(GenerationError):  # reported in-band after a 200, or as a 424 before the stream starts
        list(client.generate_stream(PROMPT, **missing))
    with pytest.raises(ValidationError) as caught:  # OpenAI's error body under /v1
        client.chat(MESSAGES, max_tokens=4, temperature=-1)
    assert caught.value.status == 422 and caught.value.message

    async def run() -> None:
        async with AsyncClient(server) as async_client:
            await async_client.generate(PROMPT, temperature=-1)

    with pytest.raises(ValidationError):
        asyncio.run(run())


def test_wait_until_ready(server: str, client: Client) -> None:
    client.wait_until_ready(timeout=10)

    async def ready() -> None:
        async with AsyncClient(server) as async_client:
            await async_client.wait_until_ready(timeout=10)

    asyncio.run(ready())
    closed = Client(f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(APITimeoutError):
        closed.wait_until_ready(timeout=1.0, interval=0.2)
    assert 1.0 <= time.monotonic() - start < 5.0

    async def run() -> None:
        await AsyncClient(f"http://127.0.0.1:{free_port()}").wait_until_ready(timeout=0.5, interval=0.1)

    with pytest.raises(APITimeoutError):
        asyncio.run(run())


# --- scripted stub ---------------------------------------------------------------------------------------------------

TOKEN = {"id": 5, "text": " ok", "logprob": -0.1, "special": False}
GENERATED = {"generated_text": " ok", "details": {"finish_reason": "length", "prompt_tokens": 3, "generated_tokens": 1,
                                                  "seed": None, "prefill": [], "tokens": [TOKEN]}}


@dataclass
class Stub:
    """Answers from `script` in order (the last answer repeats; a str body is sent as is) and records each request's
    path, headers and JSON body."""

    url: str
    script: list[tuple[int, dict[str, str], dict | str]] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.bodies.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
            state.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
            status, headers, body = state.script[min(len(state.requests), len(state.script)) - 1]
            payload = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


UNAVAILABLE = (503, {"Retry-After": "0"}, {"error": "warming up", "error_type": "unhealthy"})


def test_retries_503_then_succeeds(stub: Stub) -> None:
    stub.script = [UNAVAILABLE, UNAVAILABLE, (200, {}, GENERATED)]
    assert Client(stub.url).generate("hi").generated_text == " ok"
    assert [path for path, _ in stub.requests] == ["/generate"] * 3
    stub.requests.clear()
    assert asyncio.run(AsyncClient(stub.url, max_retries=2).generate("hi")).details.tokens[0].id == 5
    assert len(stub.requests) == 3


def test_retries_run_out(stub: Stub) -> None:
    stub.script = [UNAVAILABLE, UNAVAILABLE, (200, {}, GENERATED)]
    with pytest.raises(UnavailableError) as caught:
        Client(stub.url, max_retries=1).generate("hi")
    assert caught.value.status == 503 and caught.value.message == "warming up" and len(stub.requests) == 2


def test_429_backs_off_without_retry_after(stub: Stub) -> None:
    stub.script = [(429, {}, {"error": "Model is overloaded", "error_type": "overloaded"})]
    start = time.monotonic()
    with pytest.raises(OverloadedError):
        Client(stub.url, max_retries=2).generate("hi")
    assert len(stub.requests) == 3 and time.monotonic() - start >= 0.5  # jittered 0.25-0.5 s, then 0.5-1 s


@pytest.mark.parametrize("status", [400, 422, 424, 500])
def test_other_errors_are_not_retried(stub: Stub, status: int) -> None:
    stub.script = [(status, {}, {"error": "nope", "error_type": "x"})]
    with pytest.raises(LoraserveError) as caught:
        Client(stub.url, max_retries=3).generate("hi")
    assert caught.value.status == status and len(stub.requests) == 1


def test_connection_errors_are_retried_then_raised() -> None:
    client = Client(f"http://127.0.0.1:{free_port()}", max_retries=2)
    start = time.monotonic()
    with pytest.raises(APIConnectionError):
        client.generate("hi")
    assert time.monotonic() - start >= 0.25 + 0.5  # two backoffs happened


def test_only_set_parameters_are_sent(stub: Stub) -> None:
    stub.script = [(200, {}, GENERATED)]
    Client(stub.url).generate("hi", temperature=None, stop_sequences=["\n"], top_k=3)
    assert stub.bodies == [{"inputs": "hi", "parameters": {"stop": ["\n"], "top_k": 3, "details": True}}]


def test_stream_error_event_and_cut_off_stream_raise(stub: Stub) -> None:
    event = json.dumps({"token": TOKEN, "generated_text": None, "details": None})
    error = json.dumps({"error": "Model is overloaded", "error_type": "overloaded"})
    stub.script = [(200, {"Content-Type": "text/event-stream"}, f"data:{event}\n\ndata:{error}\n\n"),
                   (200, {"Content-Type": "text/event-stream"}, f"data:{event}\n\n")]
    client = Client(stub.url)
    received = []
    with pytest.raises(OverloadedError):
        received.extend(client.generate_stream("hi"))
    with pytest.raises(IncompleteGenerationError):
        received.extend(client.generate_stream("hi"))
    assert len(stub.requests) == 2  # an in-band error comes after a 200: it is never retried


def test_api_token_from_environment(stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    stub.script = [(200, {}, GENERATED)]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("LORASERVE_API_TOKEN", "tok-env")
    Client(stub.url).generate("hi")
    asyncio.run(AsyncClient(stub.url).generate("hi"))
    monkeypatch.delenv("LORASERVE_API_TOKEN")
    monkeypatch.setenv("HF_TOKEN", "tok-hf")
    Client(stub.url).generate("hi")
    Client(stub.url, api_token="tok-arg").generate("hi")
    Client(stub.url, headers={"authorization": "Bearer tok-header"}).generate("hi")
    monkeypatch.delenv("HF_TOKEN")
    Client(stub.url).generate("hi")
    sent = [headers.get("authorization") for _, headers in stub.requests]
    assert sent == ["Bearer tok-env", "Bearer tok-env", "Bearer tok-hf", "Bearer tok-arg",
                    "Bearer tok-header", None]


def test_client_imports_nothing_else_from_loraserve() -> None:
    code = "import json, sys, loraserve.client; print(json.dumps([m for m in sys.modules if 'loraserve' in m]))"
    modules = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout)
    assert all(m == "loraserve" or m.startswith("loraserve.client") for m in modules)
