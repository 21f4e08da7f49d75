"""Faults in what adapters come from, against a real `loraserve serve`: an S3 store (a moto server process) whose
downloads stall or are cut mid-file, that hangs and then is gone; a Hub that answers 500 and 401, or stalls
mid-file; a truncated safetensors file; a cache folder the server cannot write. Each fails only the requests for
its adapter, with a JSON error naming the adapter and no server internals, while another client's stream keeps
going, base and other adapters' requests succeed, and nothing is left running, holding KV blocks or pinned.

The S3 faults come from a relay on the path between the server and the store, which can stop forwarding (or
drop the connection) after a given number of bytes of one object's reply."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from hub_server import HubServer
from server_process import free_port, post_json, server_process
from server_state import wait_until_idle
from tiny_models import save_random_adapter, save_tiny_model, tiny_config

DOWNLOAD_TIMEOUT = 3.0  # --adapter-download-timeout of the server under test
SLACK = 5.0  # seconds a loaded 2-core machine may take past a timeout
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
S3_PREFIXES = ("good", "stall", "drop", "truncated", "unwritable", "hang", "gone")
WEIGHTS = "adapter_model.safetensors"


class FaultyRelay:
    """A TCP relay in front of the S3 store. Armed with an object key, the replies to requests naming it are cut
    short after `after` bytes: `stall` keeps the connection open and forwards nothing more until `release`, `drop`
    closes it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._fault: tuple[bytes, str, int] | None = None
        self._released = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, key: str, mode: str, after: int) -> None:
        self._released = threading.Event()
        self._fault = (key.encode(), mode, after)

    def release(self) -> None:
        """Disarm, and close the connections held stalled."""
        self._fault = None
        self._released.set()

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:  # the store is gone
            client.close()
            return
        faulty: list[tuple[str, int, threading.Event]] = []  # set once a request naming the armed key went up
        threading.Thread(target=self._up, args=(client, upstream, faulty), daemon=True).start()
        try:
            while chunk := upstream.recv(65536):
                if not faulty:
                    client.sendall(chunk)
                    continue
                mode, left, released = faulty[0]
                client.sendall(chunk[:left])
                faulty[0] = (mode, left - min(left, len(chunk)), released)
                if faulty[0][1] == 0:
                    if mode == "stall":
                        released.wait()
                    break
        except OSError:
            pass
        finally:
            for end in (client, upstream):  # shutdown first: a close alone waits for the other thread's recv
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def _up(self, client: socket.socket, upstream: socket.socket, faulty: list) -> None:
        try:
            while chunk := client.recv(65536):
                fault = self._fault
                if fault is not None and fault[0] in chunk and not faulty:
                    faulty.append((fault[1], fault[2], self._released))  # before the request goes up
                upstream.sendall(chunk)
        except OSError:
            pass


@dataclass
class Setup:
    url: str
    root: Path
    cache: Path
    local: Path  # a good local adapter
    truncated: Path  # a local adapter whose weights file is cut in half
    relay: FaultyRelay
    hub: HubServer
    moto: subprocess.Popen


def _start_moto() -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **AWS})
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "the moto server did not start"
            time.sleep(0.1)


def _without_dac_override() -> list[str]:
    """As root, file modes bind only without CAP_DAC_OVERRIDE: run the server under `setpriv` without it, so that a
    folder made read-only is read-only to the server as it would be to any service account."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made read-only to the server")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("faults")
    config = tiny_config("llama")
    config.max_position_embeddings = 4096  # the other client's stream outlasts every fault
    base_dir = save_tiny_model(config, root / "base")
    local = save_random_adapter(base_dir, root / "adapters" / "good", seed=1, r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"])
    truncated = shutil.copytree(local, root / "adapters" / "truncated")
    weights = (truncated / WEIGHTS).read_bytes()
    (truncated / WEIGHTS).write_bytes(weights[: len(weights) // 2])
    assert len(weights) > 4000  # the relay cuts replies after 2000 bytes: inside the file, past the headers

    moto, moto_port = _start_moto()
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", aws_access_key_id="test",
                      aws_secret_access_key="test", region_name="us-east-1")
    s3.create_bucket(Bucket="adapters")
    for prefix in S3_PREFIXES:
        source = truncated if prefix == "truncated" else local
        for file in source.iterdir():
            s3.upload_file(str(file), "adapters", f"team/{prefix}/{file.name}")
    relay = FaultyRelay(moto_port)
    hub = HubServer()
    for repo in ("good", "broken", "badtoken", "stall", "unwritable"):
        hub.add_repo(f"acme/{repo}", local)
    hub.add_repo("acme/private", local, token="the-right-token")
    cache = root / "cache"
    env = {**AWS, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "LORASERVE_CACHE": str(cache),
           "S3_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"}
    args = ["--model-id", str(base_dir), "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096",
            "--max-input-length", "64", "--adapter-download-timeout", str(DOWNLOAD_TIMEOUT)]
    with hub, server_process(args, root / "server.log", env=env, wrapper=_without_dac_override()) as (url, _):
        setup = Setup(url, root, cache, local, truncated, relay, hub, moto)
        for adapter_id, source in ((str(local), "local"), ("s3://adapters/team/good", "s3"), ("acme/good", "hub")):
            status, reply = _generate(setup, adapter_id, source)  # in host memory from now on
            assert status == 200, reply
        try:
            yield setup
        finally:
            relay.release()
            moto.kill()
            moto.wait()


def _generate(setup: Setup, adapter_id: str | None, source: str = "local", **parameters: object) -> tuple[int, dict]:
    chosen = {"adapter_id": adapter_id, "adapter_source": source} if adapter_id is not None else {}
    body = {"inputs": "Paris is", "parameters": {"max_new_tokens": 3, **chosen, **parameters}}
    return post_json(setup.url + "/generate", body)


def _plain_failure(setup: Setup, reply: dict, adapter_id: str) -> str:
    """The error's message, checked to name the adapter and nothing of the server's insides."""
    message = reply["error"] if isinstance(reply["error"], str) else reply["error"]["message"]
    assert adapter_id in message, message
    rest = message.replace(adapter_id, "<adapter>")  # a local adapter's id is a server path the request gave
    for internal in (str(setup.root), "127.0.0.1", "localhost", "Traceback", "http://"):
        assert internal not in rest, message
    return message


@contextmanager
def another_client_streaming(setup: Setup) -> Iterator[None]:
    """A base-model stream of another client, read on a thread while the body runs: it must receive tokens while
    the fault is served and after, and never an error. Closed (so aborted) at the end; then a base request must
    succeed and nothing may be left running or pinned."""
    host, port = setup.url.removeprefix("http://").split(":")
    payload = json.dumps({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 3500,
                                                                      "ignore_eos_token": True}}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    received = bytearray()
    stop = threading.Event()

    def read() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while received.count(b"data:") < 3:
        assert time.monotonic() < deadline and reader.is_alive(), f"the other stream did not start: {received!r}"
        time.sleep(0.05)
    started, before = time.monotonic(), received.count(b"data:")
    try:
        yield
        during, lasted = received.count(b"data:") - before, time.monotonic() - started
        assert during > 0 or lasted < 0.5, f"the other client's stream stood still for the {lasted:.1f} s of the fault"
        after = received.count(b"data:")
        while received.count(b"data:") < after + 3:
            assert time.monotonic() < deadline + 120 and reader.is_alive(), "the other client's stream stopped"
            time.sleep(0.05)
        assert b'"error"' not in received, bytes(received[-500:])
    finally:
        stop.set()
        reader.join(timeout=5)
        sock.close()
    status, reply = _generate(setup, None)
    assert status == 200, reply
    wait_until_idle(setup.url)


def test_a_stalled_s3_download_fails_only_the_requests_for_that_adapter(setup: Setup) -> None:
    """Eight requests wait on the stalled download (more than the default executor's worker threads): the base
    model, a cached adapter and a local one are served meanwhile, well before the stalled requests give up."""
    adapter_id = "s3://adapters/team/stall"
    setup.relay.arm(f"team/stall/{WEIGHTS}", "stall", after=2000)
    try:
        with another_client_streaming(setup), concurrent.futures.ThreadPoolExecutor(12) as pool:
            started = time.monotonic()
            stalled = [pool.submit(_generate, setup, adapter_id, "s3") for _ in range(8)]
            # a request whose own deadline is shorter than the download timeout: its deadline ends its wait first
            hurried = pool.submit(_generate, setup, adapter_id, "s3", request_timeout=1)
            time.sleep(0.3)  # they are waiting on the download
            for others in (None, "s3://adapters/team/good", str(setup.local)):
                status, reply = _generate(setup, others, "s3" if others and others.startswith("s3") else "local")
                assert status == 200, reply
            assert time.monotonic() - started < DOWNLOAD_TIMEOUT, "everyone else waited on the stalled download"
            for future in stalled:
                status, reply = future.result(timeout=DOWNLOAD_TIMEOUT + SLACK)
                assert status == 424 and "--adapter-download-timeout" in _plain_failure(setup, reply, adapter_id)
            assert time.monotonic() - started < DOWNLOAD_TIMEOUT + SLACK
            status, reply = hurried.result()
            assert status == 504 and reply["error_type"] == "timeout", reply
    finally:
        setup.relay.release()


def test_an_s3_download_cut_mid_file_fails_its_requests_and_leaves_nothing_half_written(setup: Setup) -> None:
    adapter_id = "s3://adapters/team/drop"
    setup.relay.arm(f"team/drop/{WEIGHTS}", "drop", after=2000)
    try:
        with another_client_streaming(setup):
            status, reply = _generate(setup, adapter_id, "s3")
            assert status == 424 and "S3 download failed" in _plain_failure(setup, reply, adapter_id), reply
    finally:
        setup.relay.release()
    s3_cache = setup.cache / "adapters" / "s3"
    assert not (s3_cache / "adapters" / "team" / "drop").exists()
    assert not list((s3_cache / ".partial").iterdir())


def test_hub_answers_500_and_401_fail_only_their_requests(setup: Setup) -> None:
    setup.hub.fail("acme/broken", 500, "Internal Server Error")
    setup.hub.fail("acme/badtoken", 401, "Invalid credentials in Authorization header")
    with another_client_streaming(setup):
        status, reply = _generate(setup, "acme/broken", "hub")
        assert status == 424 and "HTTP 500" in _plain_failure(setup, reply, "acme/broken"), reply
        for refused in ("acme/private", "acme/badtoken"):  # no token for a private repo; a token the Hub refuses
            status, reply = _generate(setup, refused, "hub")
            assert status == 424 and "not visible with the request's token" in _plain_failure(setup, reply, refused)
            status, reply = post_json(setup.url + "/v1/completions", {"model": refused, "adapter_source": "hub",
                                                                      "prompt": "x", "max_tokens": 2})
            assert status == 404 and reply["error"]["type"] == "not_found", reply
        status, reply = _generate(setup, "acme/private", "hub", api_token="the-right-token")
        assert status == 200, reply
        assert _generate(setup, "acme/good", "hub")[0] == 200


def test_a_stalled_hub_download_fails_only_its_requests(setup: Setup) -> None:
    released = setup.hub.stall("acme/stall")
    try:
        with another_client_streaming(setup):
            started = time.monotonic()
            status, reply = _generate(setup, "acme/stall", "hub")
            assert status == 424 and "--adapter-download-timeout" in _plain_failure(setup, reply, "acme/stall")
            assert DOWNLOAD_TIMEOUT <= time.monotonic() - started < DOWNLOAD_TIMEOUT + SLACK
            assert _generate(setup, "acme/good", "hub")[0] == 200
    finally:
        released.set()


def test_a_truncated_safetensors_file_fails_its_requests(setup: Setup) -> None:
    with another_client_streaming(setup):
        for adapter_id, source in ((str(setup.truncated), "local"), ("s3://adapters/team/truncated", "s3")):
            status, reply = _generate(setup, adapter_id, source)
            assert status == 424 and "cannot read its weights" in _plain_failure(setup, reply, adapter_id), reply
        assert _generate(setup, str(setup.local))[0] == 200


def test_an_unwritable_cache_folder_fails_downloads_not_the_server(setup: Setup) -> None:
    folders = [setup.cache / "adapters", *(path for path in (setup.cache / "adapters").rglob("*") if path.is_dir())]
    for folder in folders:
        folder.chmod(0o555)
    try:
        with another_client_streaming(setup):
            for adapter_id, source in (("acme/unwritable", "hub"), ("s3://adapters/team/unwritable", "s3")):
                status, reply = _generate(setup, adapter_id, source)
                message = _plain_failure(setup, reply, adapter_id)
                assert status == 424 and ("Permission denied" in message or "PermissionError" in message), message
            for held, source in (("s3://adapters/team/good", "s3"), ("acme/good", "hub"), (str(setup.local), "local")):
                assert _generate(setup, held, source)[0] == 200  # in host memory, or read in place
    finally:
        for folder in folders:
            folder.chmod(0o755)


def test_an_s3_store_that_hangs_and_then_is_gone_fails_only_cold_adapters(setup: Setup) -> None:
    """Runs last: it stops the store for good. Adapters already in host memory keep serving without it."""
    setup.moto.send_signal(signal.SIGSTOP)  # accepts connections (the kernel does) and answers nothing
    try:
        with another_client_streaming(setup):
            started = time.monotonic()
            status, reply = _generate(setup, "s3://adapters/team/hang", "s3")
            assert status == 424 and "--adapter-download-timeout" in _plain_failure(setup, reply,
                                                                                    "s3://adapters/team/hang")
            assert time.monotonic() - started < DOWNLOAD_TIMEOUT + SLACK
            assert _generate(setup, "s3://adapters/team/good", "s3")[0] == 200
    finally:
        setup.moto.send_signal(signal.SIGCONT)
    setup.moto.kill()
    setup.moto.wait()
    with another_client_streaming(setup):
        status, reply = _generate(setup, "s3://adapters/team/gone", "s3")
        assert status == 424 and "S3 download failed" in _plain_failure(setup, reply, "s3://adapters/team/gone")
        assert _generate(setup, "s3://adapters/team/good", "s3")[0] == 200
