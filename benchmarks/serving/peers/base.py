"""What a peer is to the runner, and the part every HTTP peer shares: a server subprocess on a free loopback port,
waited for through its health route, driven by the same OpenAI client, stopped at the end."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path

from benchmarks.serving.client import RequestResult, run_trace
from benchmarks.serving.workload import TimedRequest, WorkloadSpec

PEERS_DIR = Path(__file__).resolve().parents[2] / ".peers"
LOGS_DIR = Path(__file__).resolve().parents[2] / "out" / "serving"
SLOTS = 16  # adapters batched together (LoRA slots / max_loras), the same for every multi-LoRA peer
HOST_ADAPTERS = 128  # adapters cached in host memory beyond the slots, where a peer lets us set it


class Peer(ABC):
    name: str

    def __init__(self, slots: int = SLOTS) -> None:
        """`slots` adapters are batched together; a benchmark whose batch spans more adapters asks for as many."""
        self.slots = slots

    def supports(self, spec: WorkloadSpec) -> bool:
        return True

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def command(self) -> str:
        """How it was started, for the results file."""

    @abstractmethod
    def start(self, fleet: list[Path]) -> None:
        """Make every adapter of `fleet` servable; raises with the peer's own message when it cannot."""

    @abstractmethod
    def run(self, requests: list[TimedRequest], deadline_s: float) -> tuple[list[RequestResult], float]: ...

    @abstractmethod
    def stop(self) -> None: ...


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HTTPPeer(Peer):
    """A peer reached over `/v1/completions`; subclasses give the command line and how a request names its adapter."""

    startup_timeout_s = 600.0
    health_path = "/health"

    def __init__(self, slots: int = SLOTS) -> None:
        super().__init__(slots)
        self.process: subprocess.Popen | None = None
        self.base_url = ""
        self.args: list[str] = []
        self.fleet: list[Path] = []

    @abstractmethod
    def server_args(self, fleet: list[Path], port: int) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment of the server."""

    @abstractmethod
    def body(self, request: TimedRequest) -> dict: ...

    def command(self) -> str:
        return " ".join(self.args)

    def start(self, fleet: list[Path]) -> None:
        self.fleet = fleet
        port = free_port()
        self.args, env = self.server_args(fleet, port)
        LOGS_DIR.mkdir(parents=True, exist_ok=True)
        self.log = LOGS_DIR / f"{self.name}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **env})
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {self.startup_timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(1.0)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + self.health_path, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def run(self, requests: list[TimedRequest], deadline_s: float) -> tuple[list[RequestResult], float]:
        return run_trace(self.base_url, requests, self.body, deadline_s)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

