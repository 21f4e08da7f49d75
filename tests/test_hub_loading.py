"""Loading a base model by Hub id through huggingface_hub, against a local Hub stand-in (HF_ENDPOINT).

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import, so each load runs `loraserve generate` in a fresh
process with the environment set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer
from tiny_models import save_tiny_model, tiny_config

from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.sampling.params import SamplingParams

TOKEN = "hf_test_secret_token"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tiny_config("qwen3"), tmp_path_factory.mktemp("qwen3"))


def generate(env: dict[str, str], cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraserve.cli", "generate", "The quick brown fox", "--dtype", "float32",
         "--device", "cpu", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "LORASERVE_CACHE": str(cache), "HF_HUB_DISABLE_XET": "1", **env},
    )


def test_public_and_private_models_load_from_the_hub(model_dir: Path, tmp_path: Path) -> None:
    expected = LLM(EngineConfig(model_id=str(model_dir), dtype="float32", device="cpu")).generate(
        ["The quick brown fox"], SamplingParams(max_new_tokens=8)
    )[0].text
    with HubServer() as hub:
        hub.add_repo("acme/tiny-public", model_dir)
        hub.add_repo("acme/tiny-private", model_dir, token=TOKEN)
        public = generate({"HF_ENDPOINT": hub.url, "MODEL_ID": "acme/tiny-public"}, tmp_path / "c1")
        assert public.returncode == 0, public.stderr[-2000:]
        assert public.stdout.startswith(expected)
        assert any(path.endswith("model.safetensors.index.json") for _, path, _ in hub.requests)

        denied = generate({"HF_ENDPOINT": hub.url, "MODEL_ID": "acme/tiny-private"}, tmp_path / "c2")
        assert denied.returncode != 0 and "acme/tiny-private" in denied.stderr

        allowed = generate({"HF_ENDPOINT": hub.url, "MODEL_ID": "acme/tiny-private", "HF_TOKEN": TOKEN},
                           tmp_path / "c2")
        assert allowed.returncode == 0, allowed.stderr[-2000:]
        assert allowed.stdout.startswith(expected)
        assert any(auth == f"Bearer {TOKEN}" for _, path, auth in hub.requests if "tiny-private" in path)

    # the Hub is gone: offline mode serves from the cache the private download filled
    offline = generate({"HF_ENDPOINT": hub.url, "MODEL_ID": "acme/tiny-private", "HF_HUB_OFFLINE": "1"},
                       tmp_path / "c2")
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert offline.stdout.startswith(expected)
    never_cached = generate({"HF_ENDPOINT": hub.url, "MODEL_ID": "acme/other", "HF_HUB_OFFLINE": "1"},
                            tmp_path / "c3")
    assert never_cached.returncode != 0
