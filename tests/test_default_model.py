"""The default model (real Gemma 3 270M, Q4_K_M GGUF from PyPI) against transformers 5 reading the same file.

Tolerance: both sides dequantize the same GGUF to float32 and run the same math in float32, so logits agree to a
relative error (max |ours - ref| / max |ref|) of 1e-4; measured here: 0.0 (bit-identical) on the prompts below.
Greedy tokens must be identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from server_process import post_json, running_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine
from loraserve.engine.input_batch import SequenceChunk, build_step_inputs
from loraserve.engine.llm import LLM
from loraserve.layers.context import forward_context
from loraserve.models.default_model import default_model_path
from loraserve.sampling.params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Die Hauptstadt von Deutschland ist",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loraserve-cache")


@pytest.fixture(scope="module")
def engine(cache_dir: Path) -> Engine:
    return Engine.from_config(EngineConfig(dtype="float32", device="cpu", cache_dir=cache_dir))


@pytest.fixture(scope="module")
def reference(cache_dir: Path) -> Iterator[AutoModelForCausalLM]:
    path = default_model_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    yield model.eval()


def test_greedy_tokens_equal_transformers(engine: Engine, reference: AutoModelForCausalLM) -> None:
    completions = LLM(engine=engine).generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
    for prompt, completion in zip(PROMPTS, completions):
        ids = engine.tokenizer.encode(prompt)
        with torch.inference_mode():
            generated = reference.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(engine.eos_token_ids),
            )
        assert completion.token_ids == generated[0, len(ids):].tolist(), prompt
    assert "France" in completions[0].text


def test_logits_agree_with_transformers(engine: Engine, reference: AutoModelForCausalLM) -> None:
    model = engine.core.runner.model
    for prompt in PROMPTS:
        ids = engine.tokenizer.encode(prompt)
        blocks = list(range(engine.block_manager.blocks_for(len(ids))))  # the engine is idle: any blocks will do
        inputs = build_step_inputs([SequenceChunk(ids, 0, blocks)], engine.block_manager.block_size, torch.device("cpu"))
        with torch.inference_mode(), forward_context(inputs.context):
            ours = model.compute_logits(model(inputs.input_ids, inputs.positions))
            ref = reference(torch.tensor([ids])).logits[0].float()
        assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4, prompt


def test_tokenizer_and_chat_template(engine: Engine, cache_dir: Path) -> None:
    path = default_model_path(cache_dir)
    converted = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["Hello world", "  leading spaces", "Straße 東京 🙂 naïve café", "<start_of_turn>user\nhi"]:
        assert engine.tokenizer.encode(text) == converted.encode(text), text
    assert engine.tokenizer.encode("Hi")[0] == 2  # BOS first, as the GGUF asks
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert rendered == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert engine.eos_token_ids == {1, engine.tokenizer.convert_tokens_to_ids("<end_of_turn>")}


def test_serve_with_no_model_argument_works_offline(cache_dir: Path, tmp_path: Path) -> None:
    env = {"HF_HUB_OFFLINE": "1", "LORASERVE_CACHE": str(cache_dir)}
    with running_server([], tmp_path / "server.log", env=env, timeout=300) as url:
        status, body = post_json(url + "/generate", {"inputs": "The capital of France is",
                                                     "parameters": {"max_new_tokens": 8, "details": True}})
        assert status == 200 and "France" in body["generated_text"]
        assert body["details"]["generated_tokens"] == 8
        status, body = post_json(url + "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}})
        assert status == 422 and body["error_type"] == "validation"
