"""`loraserve generate` streams the same text the offline engine produces, and flags fall back to env variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_model, tiny_config

from loraserve.cli import build_parser, main
from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tiny_config("llama"), tmp_path_factory.mktemp("llama"))


def test_generate_command_streams_the_engine_output(model_dir: Path) -> None:
    expected = LLM(EngineConfig(model_id=str(model_dir), dtype="float32", device="cpu")).generate(
        ["The quick brown fox"], SamplingParams(max_new_tokens=10, ignore_eos=True)
    )[0]
    result = subprocess.run(
        [sys.executable, "-m", "loraserve.cli", "generate", "The quick brown fox", "--dtype", "float32",
         "--device", "cpu", "--max-new-tokens", "10"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "MODEL_ID": str(model_dir)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected.text)
    assert f"[{len(expected.tokens)} tokens, finish_reason={expected.finish_reason.value}]" in result.stdout


def test_serve_flags_match_the_lorax_launcher() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    for flag in ("--model-id", "--hostname", "--port", "--max-input-length", "--max-total-tokens",
                 "--max-batch-prefill-tokens", "--max-batch-total-tokens", "--max-concurrent-requests", "--dtype"):
        assert flag in flags


def test_bad_environment_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_TOTAL_TOKENS", "lots")
    with pytest.raises(ValueError, match="MAX_TOTAL_TOKENS"):
        main(["generate", "hi"])
