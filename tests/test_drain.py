"""A clean drain on SIGTERM, and abandoned plain requests aborted, against a real `loraserve serve` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import free_port, post_json, running_server
from tiny_models import save_tiny_model, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config("llama")
    config.max_position_embeddings = 4096  # long generations: the abort, not the end, must stop them
    return save_tiny_model(config, tmp_path_factory.mktemp("drain"))


def _start(model_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "loraserve.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port),
               "--model-id", str(model_dir), "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096",
               "--max-input-length", "64", *extra]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except (urllib.error.URLError, ConnectionError):
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)


def _open_stream(url: str, tokens: int) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps({"inputs": "Once upon a time", "parameters": {"max_new_tokens": tokens,
                                                                      "ignore_eos_token": True}}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    sock.settimeout(60)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _events(raw: bytes) -> list[dict]:
    return [json.loads(line[5:]) for line in raw.split(b"\n") if line.startswith(b"data:")]


def test_sigterm_finishes_what_runs_and_refuses_what_comes(model_dir: Path, tmp_path: Path) -> None:
    process, url = _start(model_dir, tmp_path / "server.log", "--shutdown-timeout", "60")
    try:
        sock = _open_stream(url, 400)
        assert sock.recv(65536)  # headers, and the stream has begun
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, reply = post_json(url + "/generate", {"inputs": "late", "parameters": {"max_new_tokens": 2}})
        assert status == 503 and "shutting down" in reply["error"]
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(url + "/health", timeout=5)
        assert health.value.code == 503
        events = _events(_read_all(sock))
        assert events[-1]["details"]["generated_tokens"] == 400  # the accepted request ran to its end
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_past_the_shutdown_timeout_a_stream_ends_with_an_error_event(model_dir: Path, tmp_path: Path) -> None:
    process, url = _start(model_dir, tmp_path / "server.log", "--shutdown-timeout", "0.5")
    try:
        sock = _open_stream(url, 4000)
        assert sock.recv(65536)
        process.send_signal(signal.SIGTERM)
        events = _events(_read_all(sock))
        assert "error" in events[-1] and "shutting down" in events[-1]["error"], events[-1]
        assert len(events) - 1 < 4000
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_a_plain_request_whose_client_left_is_aborted(model_dir: Path, tmp_path: Path) -> None:
    with running_server(["--model-id", str(model_dir), "--dtype", "float32", "--device", "cpu",
                         "--max-total-tokens", "4096", "--max-input-length", "64"], tmp_path / "server.log") as url:
        host, port = url.removeprefix("http://").split(":")
        payload = json.dumps({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 4000,
                                                                          "ignore_eos_token": True}}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            time.sleep(1.0)  # it is generating
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
                families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
            running = families["loraserve:num_requests_running"].samples[0].value
            if running == 0:
                break
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.1)
        generated = sum(s.value for s in families["loraserve:generation_tokens"].samples if s.name.endswith("_total"))
        assert 0 < generated < 4000  # stopped by the abort, not by reaching its end


def test_an_oversized_body_is_a_413_while_others_keep_streaming(model_dir: Path, tmp_path: Path) -> None:
    """A body over the limit is refused before it is parsed, and a 1 MiB prompt is tokenized off the event loop:
    another client's stream and /health keep answering meanwhile."""
    with running_server(["--model-id", str(model_dir), "--dtype", "float32", "--device", "cpu",
                         "--max-request-bytes", str(2 << 20)], tmp_path / "server.log") as url:
        host, port = url.removeprefix("http://").split(":")
        for path in ("/generate", "/v1/completions"):
            with socket.create_connection((host, int(port))) as raw:  # the answer comes before the body is sent
                raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            f"Content-Length: {3 << 20}\r\n\r\n".encode() + b'{"inputs": "')
                raw.settimeout(30)
                answer = _read_all(raw)
            assert answer.startswith(b"HTTP/1.1 413") and b"--max-request-bytes" in answer, answer[:300]
        sock = _open_stream(url, 200)
        try:
            assert sock.recv(65536)
            big = {"inputs": "word " * (200 << 10), "parameters": {"max_new_tokens": 2}}  # 1 MiB: too long a prompt
            status, reply = post_json(url + "/generate", big)
            assert status == 422 and "tokens" in reply["error"]
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                assert response.status == 200
            events = _events(_read_all(sock))
            assert events[-1]["details"]["generated_tokens"] == 200
        finally:
            sock.close()
