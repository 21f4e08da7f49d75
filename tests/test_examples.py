"""The lesson's programs (examples/) end to end on a tiny random model, each in its --quick size: their figures are
numbers that say what the lesson says, their plots are written, the extraction output validates into its pydantic
model, and concurrent streams interleave."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from console_tools import console_tool
from tiny_models import save_random_adapter, save_tiny_model, tiny_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import batching  # noqa: E402 - the examples folder is on the path from here on
import continuous_batching  # noqa: E402
import kv_cache  # noqa: E402
import lesson_server  # noqa: E402
import multi_lora  # noqa: E402
import quantization  # noqa: E402
from lesson_data import ENTITY_TYPES, TASKS  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A tiny Llama and one random PEFT adapter per lesson task."""
    root = tmp_path_factory.mktemp("lesson")
    base = save_tiny_model(tiny_config("llama"), root / "model")
    adapters = {task: save_random_adapter(base, root / task, seed=seed, r=4, lora_alpha=16,
                                          target_modules=["q_proj", "v_proj", "down_proj"])
                for seed, task in enumerate(TASKS, start=1)}
    return base, adapters


@pytest.fixture(autouse=True)
def torch_threads() -> Iterator[None]:
    """--threads 1 sets torch's threads for the whole process: give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def quick(model: Path, plots: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--quick", "--threads", "1", "--plots-dir", str(plots), *extra]


def assert_plot(path: str, plots: Path, name: str) -> None:
    assert Path(path) == plots / f"{name}.png"
    assert Path(path).read_bytes().startswith(PNG_SIGNATURE)


def assert_positive(*values: float) -> None:
    for value in values:
        assert isinstance(value, float) and math.isfinite(value) and value > 0, value


def test_kv_cache(tiny, tmp_path: Path) -> None:
    figures = kv_cache.main(quick(tiny[0], tmp_path, "--dtype", "float32"))
    assert figures["new_tokens"] == 8 and figures["prompt_tokens"] > 100
    assert_positive(figures["prefill_ms"], figures["decode_ms_per_token"], figures["cached_total_s"],
                    figures["uncached_total_s"])
    assert figures["shared_tokens"] == 8  # in float32, re-prefilling gives the cached path's greedy tokens
    assert figures["speedup"] > 1  # a 100+ token re-prefill per token against a one-token decode step
    assert_plot(figures["plot"], tmp_path, "kv_cache")


def test_batching(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures = batching.main(quick(tiny[0], tmp_path))
    assert [row["batch"] for row in figures["rows"]] == [1, 2, 4]
    for row in figures["rows"]:
        assert_positive(row["throughput_tok_s"], row["mean_latency_s"], row["decode_ms_per_token"])
    assert "| 4 |" in capsys.readouterr().out
    assert_plot(figures["plot"], tmp_path, "batching")


def test_continuous_batching(tiny, tmp_path: Path) -> None:
    figures = continuous_batching.main(quick(tiny[0], tmp_path))
    static, continuous = figures["static"], figures["continuous"]
    for policy in (static, continuous):
        assert_positive(policy["throughput_tok_s"], policy["mean_latency_s"], policy["p90_latency_s"],
                        policy["makespan_s"])
    # static requests wait for a full batch and reply when its longest is done
    assert continuous["mean_wait_s"] < static["mean_wait_s"]
    assert continuous["mean_latency_s"] < static["mean_latency_s"]
    assert_plot(figures["plot"], tmp_path, "continuous_batching")


def test_quantization(tiny, tmp_path: Path) -> None:
    figures = quantization.main(quick(tiny[0], tmp_path))
    rows = figures["rows"]
    assert list(rows) == ["bfloat16", "int8", "int4"]
    for row in rows.values():
        assert_positive(row["memory_mb"], row["decode_tok_s"], row["batch_tok_s"], row["perplexity"])
        assert 0 <= row["greedy_agreement"] <= 1
    assert rows["bfloat16"]["greedy_agreement"] == 1 and rows["bfloat16"]["perplexity_change_pct"] == 0
    assert abs(rows["int8"]["perplexity_change_pct"]) < 5  # per-channel int8 barely moves a model's predictions
    assert_plot(figures["plot"], tmp_path, "quantization")


def test_multi_lora(tiny, tmp_path: Path) -> None:
    adapters = [str(tiny[1][task]) for task in TASKS[:2]]  # two folders: the other two adapters are variants
    figures = multi_lora.main(quick(tiny[0], tmp_path, "--dtype", "float32", "--adapters", *adapters))
    assert figures["requests"] == 8 and figures["distinct_adapters"] == 4
    assert_positive(figures["base_tok_s"], figures["one_lora_tok_s"], figures["many_lora_tok_s"],
                    figures["one_at_a_time_tok_s"])
    assert figures["same_as_alone"] == 8  # each row of the mixed batch is what its adapter gives alone
    assert figures["shared_token_share"] == 1
    assert figures["max_logprob_gap"] < 1e-3
    assert figures["changed_by_adapter"] == 8
    assert_plot(figures["plot"], tmp_path, "multi_lora")


def test_lesson_server(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, adapters = tiny
    flags = [flag for task in TASKS for flag in (f"--{task}-adapter", str(adapters[task]))]
    figures = lesson_server.main(quick(base, tmp_path, "--ignore-eos", *flags))
    out = capsys.readouterr().out
    assert "GET /health answered 200" in out
    assert_positive(figures["generate_s"], figures["stream"]["ttft_s"], figures["stream"]["tok_s"])
    for task in TASKS:
        result = figures["tasks"][task]
        assert result["text"] and result["text"] != result["base_text"]  # the adapter is applied
        assert_positive(result["ttft_s"])
    concurrent = figures["concurrent"]
    assert concurrent["labels"] == [*TASKS, "base"]
    assert sorted(set(concurrent["order"])) == [0, 1, 2, 3] and len(concurrent["order"]) == 4 * 12
    assert concurrent["switches"] > 3 * 3  # interleaved, not one stream after another (3 switches)
    for code in lesson_server.COLOURS:
        assert f"\x1b[{code}m" in out
    assert set(lesson_server.Entities.model_fields) == set(ENTITY_TYPES)
    for label in ("base", "adapter"):  # schema-constrained: a finished answer validates whatever a random model writes
        if figures["structured"][label] is not None:  # None: cut off at the token budget, which a random model may hit
            lesson_server.Entities.model_validate(figures["structured"][label])
        assert f"{label}, schema-constrained: " in out
    for label in ("base", "adapter", "adapter_unconstrained"):
        assert 0 <= figures["structured"][f"{label}_hits"] <= figures["structured"]["expected"]
    assert figures["structured"]["expected"] >= 1  # the lesson's held-out example, scored
    for path, name in zip(figures["plots"], ("lesson_server_stream", "lesson_server_concurrent")):
        assert_plot(path, tmp_path, name)


def test_one_command_runs_every_step() -> None:
    """`examples/run_all.sh` is the full lesson: it passes shellcheck and runs every program of examples/ that has a
    command line (the modules without one are the programs' shared code)."""
    import subprocess

    script = EXAMPLES / "run_all.sh"
    checked = subprocess.run([console_tool("shellcheck"), "--color=never", str(script)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout
    programs = {path.name for path in EXAMPLES.glob("*.py") if '__name__ == "__main__"' in path.read_text()}
    assert programs and programs == set(re.findall(r"examples/(\w+\.py)", script.read_text()))
