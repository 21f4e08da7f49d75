"""Greedy generation through the whole engine equals transformers' `generate`, token for token, for every family.

Requests of different lengths join the running batch at different steps and finish at different steps; a second run
gives the KV cache so few blocks that requests are preempted and recomputed, and must still produce the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, save_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine
from loraserve.sampling.params import SamplingParams

PROMPTS = [
    "The quick brown fox",
    "Paris is the capital of France; Berlin",
    "def add(a, b):",
    "Straße, café, naïve, 東京 — multi-byte",
    "Once",
    '{"name": "loraserve", "adapters": [1, 2',
]
MAX_NEW = [12, 5, 20, 9, 16, 7]
JOIN_AT_STEP = [0, 0, 1, 3, 3, 6]  # engine step at which each request is added


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tiny_config(request.param), tmp_path_factory.mktemp(request.param))


def reference_generations(model_dir: Path, prompt_ids: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    outputs = []
    for ids, max_new in zip(prompt_ids, MAX_NEW):
        generated = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new, do_sample=False,
        )
        outputs.append(generated[0, len(ids):].tolist())
    return outputs


def engine_generations(engine: Engine) -> tuple[list[list[int]], int]:
    """Run PROMPTS with staggered arrivals; returns token ids per prompt and the number of preemptions."""
    requests = [engine.make_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS, MAX_NEW)]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: set[str] = set()
    step = 0
    while len(finished) < len(requests):
        for request, join in zip(requests, JOIN_AT_STEP):
            if join == step:
                engine.add(request)
        for output in engine.step():
            tokens[output.request_id].extend(t.id for t in output.tokens)
            if output.finished:
                finished.add(output.request_id)
        step += 1
        assert step < 500
    return [tokens[r.request_id] for r in requests], engine.core.scheduler.num_preemptions


def make_engine(model_dir: Path, **overrides: object) -> Engine:
    config = EngineConfig(model_id=str(model_dir), dtype="float32", device="cpu", max_input_length=64,
                          max_total_tokens=96, block_size=4, **overrides)
    return Engine.from_config(config)


def test_greedy_matches_transformers_with_staggered_batches(model_dir: Path) -> None:
    engine = make_engine(model_dir, max_batch_prefill_tokens=24)
    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    expected = reference_generations(model_dir, prompt_ids)
    got, _ = engine_generations(engine)
    assert got == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_greedy_matches_transformers_under_preemption(model_dir: Path) -> None:
    engine = make_engine(model_dir, max_batch_prefill_tokens=64, max_batch_total_tokens=96)
    prompt_ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    expected = reference_generations(model_dir, prompt_ids)
    got, preemptions = engine_generations(engine)
    assert preemptions > 0, "the KV budget was meant to force preemption"
    assert got == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
