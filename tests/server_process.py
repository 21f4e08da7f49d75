"""Starts `loraserve serve` as a real process on a free loopback port, and stops it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(args: list[str], log_path: Path, env: dict[str, str] | None = None,
                   timeout: float = 180.0, until_ready: bool = True) -> Iterator[str]:
    """Yield the base URL of a `loraserve serve` process started with `args` once /health answers 200 (or, with
    `until_ready=False`, once it answers at all: the model may still be loading); the process is stopped on exit."""
    with server_process(args, log_path, env, timeout, until_ready) as (base_url, _):
        yield base_url


@contextmanager
def server_process(args: list[str], log_path: Path, env: dict[str, str] | None = None, timeout: float = 180.0,
                   until_ready: bool = True, wrapper: Sequence[str] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """`running_server`, also yielding the process (to read its /proc entry); `wrapper` prefixes the command (e.g.
    `setpriv` to run it with fewer capabilities)."""
    port = free_port()
    command = [*wrapper, sys.executable, "-m", "loraserve.cli", "serve", "--hostname", "127.0.0.1", "--port",
               str(port), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except urllib.error.HTTPError:
                if not until_ready:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {timeout} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield base_url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def post_json(url: str, body: dict, timeout: float = 120.0, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
