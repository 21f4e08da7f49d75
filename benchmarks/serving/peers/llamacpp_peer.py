"""llama-cpp-python's server in its own venv: the Q4_K_M GGUF itself with one LoRA (converted from the PEFT adapter
by llama.cpp's convert_lora_to_gguf.py) applied to every request. It has no per-request adapters and serializes
requests, so it only runs the one-adapter workloads: a single-stream reference, not a multi-LoRA peer. Started with
no adapters, it serves the base model instead."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks.serving.assets import CACHE, gguf_path, hf_model_dir
from benchmarks.serving.client import completion_body
from benchmarks.serving.peers.base import PEERS_DIR, HTTPPeer
from benchmarks.serving.workload import TimedRequest, WorkloadSpec

PYTHON = PEERS_DIR / "llamacpp" / "bin" / "python"


def _converter() -> Path:
    found = sorted(PEERS_DIR.glob("llamacpp-src/*/vendor/llama.cpp/convert_lora_to_gguf.py"))
    if not found:
        raise RuntimeError("convert_lora_to_gguf.py missing: run benchmarks/serving/install_peers.sh llamacpp")
    return found[-1]


class LlamaCppPeer(HTTPPeer):
    name = "llama-cpp-python"
    health_path = "/v1/models"  # its server has no /health route

    def supports(self, spec: WorkloadSpec) -> bool:
        if not self.fleet:
            return spec.popularity == "base"
        return spec.popularity != "base" and spec.adapters == 1

    def version(self) -> str:
        if not PYTHON.exists():
            return "not installed"
        found = subprocess.run([PYTHON, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                               capture_output=True, text=True).stdout.strip()
        return f"llama-cpp-python {found or '?'} (Q4_K_M weights, f16 LoRA)"

    def server_args(self, fleet: list[Path], port: int) -> tuple[list[str], dict[str, str]]:
        if not PYTHON.exists():
            raise RuntimeError(f"{PYTHON} missing: run benchmarks/serving/install_peers.sh llamacpp")
        lora = ["--lora_path", str(_lora(fleet[0]))] if fleet else []
        return ([str(PYTHON), "-m", "llama_cpp.server", "--host", "127.0.0.1", "--port", str(port),
                 "--model", str(gguf_path()), *lora, "--n_ctx", "2048", "--n_threads", "2",
                 "--interrupt_requests", "False"], {})  # queue requests: by default a new one cuts the stream

    def body(self, request: TimedRequest) -> dict:
        return completion_body(request, "default", min_tokens=request.output_tokens)


def _lora(adapter: Path) -> Path:
    """The PEFT adapter as a GGUF LoRA, converted once."""
    lora = CACHE / f"{adapter.name}.gguf"
    if not lora.exists():
        # run with our interpreter: the script needs torch, transformers and numpy, which .venv has
        converted = subprocess.run([sys.executable, str(_converter()), "--base", str(hf_model_dir()),
                                    "--outtype", "f16", "--outfile", str(lora), str(adapter)],
                                   capture_output=True, text=True)
        if converted.returncode != 0:
            raise RuntimeError(f"convert_lora_to_gguf.py failed: {converted.stderr[-2000:]}")
    return lora
