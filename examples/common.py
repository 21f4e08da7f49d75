"""What the lesson's programs share: their flags, the engine they build, the step loop on the main thread, plots and
tables. Everything here goes through loraserve's public API (`loraserve.engine.llm`, `loraserve.engine.api`)."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
import numpy

matplotlib.use("Agg")  # files only: the lesson runs on machines without a display

import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
import torch  # noqa: E402

from loraserve.config import EngineConfig  # noqa: E402
from loraserve.engine.api import AsyncEngine, Completion  # noqa: E402
from loraserve.sampling.grammar import GrammarSpec  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
PLOTS = EXAMPLES / "plots"
T = TypeVar("T")


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every lesson program takes: which model, and how big a run."""
    flags = argparse.ArgumentParser(description=description)
    flags.add_argument("--model", default=None,
                       help="HF folder, Hub id or .gguf file (default: the bundled Gemma 3 270M)")
    flags.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: bfloat16 on CPU)")
    flags.add_argument("--quick", action="store_true",
                       help="a few short requests: seconds on a tiny model (what the test suite runs)")
    flags.add_argument("--plots-dir", type=Path, default=PLOTS, help=f"where plots go (default {PLOTS})")
    flags.add_argument("--threads", type=int, default=None,
                       help="torch threads (default: torch's choice); 1 is steadier on a busy 2-core machine")
    return flags


def parse(flags: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = flags.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def engine_config(args: argparse.Namespace, **settings: Any) -> EngineConfig:
    if args.quick:
        # a tiny model's few requests need far less than the default KV pool, which takes a while to allocate
        settings.setdefault("kv_cache_memory", 64 << 20)
    return EngineConfig(model_id=args.model, dtype=args.dtype, **settings)


def drive(config: EngineConfig, scenario: Callable[[AsyncEngine], Coroutine[Any, Any, T]]) -> T:
    """Load the model and await `scenario(engine)` from an asyncio loop in a second thread, while the engine's step
    loop holds this (main) thread as it does in `loraserve serve`: oneDNN's bf16 matmuls run markedly slower when
    issued from any other thread (see `AsyncEngine.run`), so the figures are the server's."""
    engine = AsyncEngine.from_config(config)
    outcome: dict[str, Any] = {}

    def client() -> None:
        while not engine.is_running:
            time.sleep(0.001)
        try:
            outcome["value"] = asyncio.run(_after_grammar_build(engine, scenario))
        except BaseException as error:  # noqa: BLE001 - re-raised on the main thread below
            outcome["error"] = error
        finally:
            engine.shutdown()

    thread = threading.Thread(target=client, name="lesson-client")
    thread.start()
    engine.run()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


async def _after_grammar_build(engine: AsyncEngine, scenario: Callable[[AsyncEngine], Coroutine[Any, Any, T]]) -> T:
    # The engine builds llguidance's tokenizer beside the step loop when it starts (seconds for a large vocabulary);
    # waiting for it keeps that build out of every timed step.
    await engine.compile_grammar(GrammarSpec.json_object())
    return await scenario(engine)


def decode_seconds_per_token(completion: Completion) -> float:
    """Mean time between a request's tokens after its first: what one decode step costs it."""
    timings = completion.timings
    if timings is None or timings.first_token is None or timings.finished is None or len(completion.tokens) < 2:
        raise ValueError(f"request {completion.request_id} has no decode steps to time")
    return (timings.finished - timings.first_token) / (len(completion.tokens) - 1)


def latency_seconds(completion: Completion) -> float:
    timings = completion.timings
    if timings is None or timings.finished is None:
        raise ValueError(f"request {completion.request_id} has not finished")
    return timings.finished - timings.arrival


def shared_prefix(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """How many leading tokens two greedy generations share: after the first difference each continues its own text,
    so later positions say nothing more."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def percentile(values: Sequence[float], share: float) -> float:
    return float(numpy.quantile(values, share))


def save_plot(figure: plt.Figure, plots_dir: Path, name: str) -> Path:
    plots_dir.mkdir(parents=True, exist_ok=True)
    path = plots_dir / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"plot: {path}")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A table to print and to paste into examples/README.md as it is."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
