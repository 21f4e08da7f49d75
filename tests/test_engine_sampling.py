"""Engine-level behaviour of sampling and stopping: seeds across batch compositions, stop strings, EOS ids, lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.engine.request import FinishReason
from loraserve.sampling.params import SamplingParams

OTHER_PROMPTS = ["Paris is", "def add(a, b):", "Once upon a time there", "東京"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tiny_config("llama"), tmp_path_factory.mktemp("llama"))


def make_llm(model_dir: Path, **overrides: object) -> LLM:
    config = EngineConfig(model_id=str(model_dir), dtype="float32", device="cpu", max_input_length=64,
                          max_total_tokens=128, block_size=4, **overrides)
    return LLM(config)


def test_seeded_sampling_is_independent_of_the_batch(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    sampled = SamplingParams(max_new_tokens=24, temperature=1.3, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate(["The quick brown fox"], sampled)[0].token_ids
    others = [SamplingParams(max_new_tokens=n, temperature=0.9, ignore_eos=True) for n in (5, 30, 12, 17)]
    first = llm.generate(["The quick brown fox", *OTHER_PROMPTS], [sampled, *others])[0].token_ids
    last = llm.generate([*OTHER_PROMPTS, "The quick brown fox"], [*others, sampled])[-1].token_ids
    assert alone == first == last
    different_seed = SamplingParams(max_new_tokens=24, temperature=1.3, top_k=50, top_p=0.95, seed=99, ignore_eos=True)
    assert llm.generate(["The quick brown fox"], different_seed)[0].token_ids != alone


def test_seeded_sampling_survives_preemption(model_dir: Path) -> None:
    sampled = SamplingParams(max_new_tokens=40, temperature=1.0, seed=7, ignore_eos=True)
    roomy = make_llm(model_dir).generate(["The quick brown fox"], sampled)[0].token_ids
    tight = make_llm(model_dir, max_batch_total_tokens=128)
    crowd = [SamplingParams(max_new_tokens=60, temperature=1.0, seed=i, ignore_eos=True) for i in range(4)]
    results = tight.generate([*OTHER_PROMPTS, "The quick brown fox"], [*crowd, sampled])
    assert tight.engine.core.scheduler.num_preemptions > 0
    assert results[-1].token_ids == roomy


def test_stop_sequence_across_token_boundaries(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    free = llm.generate(["The quick brown fox"], SamplingParams(max_new_tokens=30, ignore_eos=True))[0]
    # a stop string that starts inside one token and ends inside a later one
    pieces = [t.text for t in free.tokens]
    start = len(pieces[0]) + len(pieces[1]) // 2 if len(pieces[1]) > 1 else len(pieces[0]) + 1
    stop = free.text[start : start + 5]
    assert len(stop) == 5
    stopped = llm.generate(["The quick brown fox"], SamplingParams(max_new_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert stopped.finish_reason is FinishReason.STOP_SEQUENCE
    cut = free.text.index(stop)
    assert stopped.text in (free.text[:cut], free.text[: cut + len(stop)])
    assert "".join(t.text for t in stopped.tokens) == stopped.text, "streamed text must equal the final text"
    assert len(stopped.tokens) < len(free.tokens)


def test_every_eos_id_of_the_model_stops_generation(model_dir: Path, tmp_path: Path) -> None:
    free = make_llm(model_dir).generate(["Paris is"], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    third = free.token_ids[2]
    # a second EOS id listed only in generation_config.json, as Llama 3 and Gemma 3 do
    moved = tmp_path / "model"
    moved.mkdir()
    for item in model_dir.iterdir():
        (moved / item.name).symlink_to(item)
    (moved / "generation_config.json").unlink()
    (moved / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, third], "bos_token_id": 2}))
    result = make_llm(moved).generate(["Paris is"], SamplingParams(max_new_tokens=20))[0]
    first_hit = min(i for i, t in enumerate(free.token_ids) if t in (1, third))
    assert result.token_ids == free.token_ids[: first_hit + 1]
    assert result.finish_reason is FinishReason.EOS_TOKEN
    ignored = make_llm(moved).generate(["Paris is"], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert ignored.token_ids == free.token_ids and ignored.finish_reason is FinishReason.LENGTH


def test_stop_token_ids_and_length(model_dir: Path) -> None:
    llm = make_llm(model_dir)
    free = llm.generate(["Paris is"], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert len(free.tokens) == 20 and free.finish_reason is FinishReason.LENGTH
    target = free.token_ids[4]
    cut = llm.generate(["Paris is"], SamplingParams(max_new_tokens=20, ignore_eos=True, stop_token_ids=[target]))[0]
    assert cut.token_ids == free.token_ids[: free.token_ids.index(target) + 1]
    assert cut.finish_reason is FinishReason.EOS_TOKEN


def test_prompt_logprobs_across_prefill_chunks_match_transformers(model_dir: Path) -> None:
    llm = make_llm(model_dir, max_batch_prefill_tokens=8)
    prompt = "Once upon a time there was a small model that answered"
    result = llm.generate([prompt], SamplingParams(max_new_tokens=2, prompt_logprobs=2))[0]
    ids = llm.engine.tokenizer.encode(prompt)
    assert len(ids) > 16, "the prompt must span several prefill chunks"
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    assert [entry[0] for entry in result.prompt_logprobs] == ids[1:]
    for position, (token, logprob, top) in enumerate(result.prompt_logprobs):
        assert logprob == pytest.approx(expected[position, token].item(), abs=1e-4)
        assert [t for t, _ in top] == expected[position].topk(2).indices.tolist()
