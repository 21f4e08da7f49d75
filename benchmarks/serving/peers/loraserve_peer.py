"""Our server: `loraserve serve` on the GGUF, bf16, adapters named as `model` by their local folder (read from disk on
first use, like vLLM's lazily loaded `--lora-modules`)."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

from benchmarks.serving.client import completion_body
from benchmarks.serving.peers.base import HOST_ADAPTERS, HTTPPeer
from benchmarks.serving.workload import TimedRequest

ADAPTER_BYTES = 8 << 20  # one rank-16 adapter on all projections of the 270M model in bf16 is about 7.6 MB


class LoraservePeer(HTTPPeer):
    name = "loraserve"

    def version(self) -> str:
        return f"loraserve {version('loraserve')} (this work tree)"

    def server_args(self, fleet: list[Path], port: int) -> tuple[list[str], dict[str, str]]:
        return ([sys.executable, "-m", "loraserve.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port),
                 "--dtype", "bfloat16", "--max-active-adapters", str(self.slots), "--max-lora-rank", "16",
                 "--adapter-memory", str(HOST_ADAPTERS * ADAPTER_BYTES), "--max-concurrent-requests", "4096"], {})

    def body(self, request: TimedRequest) -> dict:
        if request.adapter is None:
            return completion_body(request, "")
        return completion_body(request, str(self.fleet[request.adapter]), adapter_source="local")
