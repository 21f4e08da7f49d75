"""The async front: concurrent streams equal their offline results, and an abandoned stream frees its blocks at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tiny_models import save_tiny_model, tiny_config

from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.engine import Engine
from loraserve.engine.llm import LLM, collect
from loraserve.errors import InvalidRequest
from loraserve.sampling.params import SamplingParams

PROMPTS = ["The quick brown fox", "Paris is", "def add(a, b):", "Once upon"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tiny_config("gemma3"), tmp_path_factory.mktemp("gemma3"))


def make_engine(model_dir: Path) -> Engine:
    return Engine.from_config(EngineConfig(model_id=str(model_dir), dtype="float32", device="cpu",
                                           max_input_length=32, max_total_tokens=128))


def test_concurrent_streams_equal_offline_results_and_abort_frees_blocks(model_dir: Path) -> None:
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    expected = [c.token_ids for c in LLM(engine=make_engine(model_dir)).generate(PROMPTS, params)]
    engine = AsyncEngine(make_engine(model_dir))

    async def scenario() -> None:
        completions = await asyncio.gather(*(collect(engine.generate(p, params)) for p in PROMPTS))
        assert [c.token_ids for c in completions] == expected
        stream = engine.generate("The quick brown fox", SamplingParams(max_new_tokens=100, ignore_eos=True))
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                assert engine.stats().num_free_kv_blocks < engine.stats().num_kv_blocks
                break
        await stream.aclose()  # what a disconnected client's response does: it sends the abort
        # The abort and this call cross into the loop in order, so this runs at most one step after the abort,
        # with 90-odd tokens of the request still to go: only a working abort leaves the engine empty here.
        after = await engine.run_between_steps(engine.stats)
        assert (after.num_running, after.num_waiting) == (0, 0)
        assert after.num_free_kv_blocks == after.num_kv_blocks
        with pytest.raises(InvalidRequest):
            engine.generate("x", SamplingParams(max_new_tokens=0))

    engine.start()
    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
