"""The default model (real Gemma 3 270M, Q4_K_M GGUF from PyPI) through our GGUF loader, against transformers 5 reading
the same file (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`).

Both sides dequantize the same GGUF to float32 and undo the same llama.cpp transforms, so every parameter is
bit-identical (asserted), and so is the config. Our model runs through the paged KV cache (tests/model_harness.py):
the four prompts prefill together in one flat step, then decode together for 12 steps.

Measured relative error max |ours - ref| / max |ref| (logits reach |22|-|38|): prefill, every position: 2.4e-6
(max abs 6.4e-5); decode steps vs the logits `generate` computed: 1.2e-6 (max abs 3.2e-5). Tolerance: 1e-4 relative,
about 40x the measured value: it absorbs fp32 reduction-order noise, while a wrong mapping or transform moves logits
by whole units. Greedy continuations (12 tokens) must be identical.

Timings on 2 idle cores: our GGUF load 8.3 s (metadata 2.8 s, dequantize + copy 5.4 s), tokenizer conversion ~20 s
once (then ~4 s from the cache); transformers' reference load ~45 s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from model_harness import PagedHarness, batched_prefill_errors, relative_error
from server_process import post_json, running_server
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from loraserve.errors import UnsupportedModel
from loraserve.models import gguf as gguf_loader
from loraserve.models.base import CausalLM
from loraserve.models.default_model import default_model_path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Die Hauptstadt von Deutschland ist",
]
NEW_TOKENS = 12
LOGITS_RTOL = 1e-4  # of max |ref logit|; measured 2.4e-6


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loraserve-cache")


@pytest.fixture(scope="module")
def gguf_path(cache_dir: Path) -> Path:
    return default_model_path(cache_dir)


@pytest.fixture(scope="module")
def tokenizer(gguf_path: Path, cache_dir: Path) -> PreTrainedTokenizerFast:
    return gguf_loader.gguf_tokenizer(gguf_path, cache_dir / "tokenizers")  # converts once, then loads the cache


@pytest.fixture(scope="module")
def model(gguf_path: Path) -> CausalLM:
    return gguf_loader.load_gguf_model(gguf_path, torch.float32, torch.device("cpu"))


@pytest.fixture(scope="module")
def reference(gguf_path: Path) -> Iterator[AutoModelForCausalLM]:
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    yield model.eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer: PreTrainedTokenizerFast) -> list[list[int]]:
    ids = [tokenizer.encode(prompt) for prompt in PROMPTS]
    assert all(tokens[0] == 2 for tokens in ids)  # BOS first, as the GGUF asks (add_bos_token)
    return ids


def test_weights_and_config_equal_transformers(model: CausalLM, reference: AutoModelForCausalLM) -> None:
    ours = dict(model.named_parameters(remove_duplicate=False))
    ref = dict(reference.named_parameters(remove_duplicate=False))
    assert ours.keys() == ref.keys()
    assert [name for name in ours if not torch.equal(ours[name], ref[name])] == []
    ignored = {"architectures", "dtype", "quantization_config", "_name_or_path", "_model_name_or_path"}
    ours_config, ref_config = model.config.to_dict(), reference.config.to_dict()
    assert {k: v for k, v in ours_config.items() if k not in ignored} == {
        k: v for k, v in ref_config.items() if k not in ignored
    }


def test_prefill_logits_agree_with_transformers(
    model: CausalLM, reference: AutoModelForCausalLM, prompt_ids: list[list[int]]
) -> None:
    """All four prompts in one flat prefill step through the paged KV cache; logits at every position."""
    errors = batched_prefill_errors(model, reference, prompt_ids)
    assert max(errors.values()) <= LOGITS_RTOL, errors


def test_greedy_decode_equals_transformers_generate(
    model: CausalLM, reference: AutoModelForCausalLM, tokenizer: PreTrainedTokenizerFast,
    prompt_ids: list[list[int]],
) -> None:
    """Ours: the four prompts prefilled together, then decoded together through the paged KV cache, argmax each step.
    The same tokens as `generate(do_sample=False)`, and each step's logits agree with the ones generate computed."""
    harness = PagedHarness(model, len(prompt_ids), max_tokens_per_sequence=32)
    tokens: list[list[int]] = [[] for _ in prompt_ids]
    logits: list[list[torch.Tensor]] = [[] for _ in prompt_ids]
    chunks = [list(ids) for ids in prompt_ids]
    for _ in range(NEW_TOKENS):
        for i, step_logits in harness.run(chunks).items():
            tokens[i].append(int(step_logits.argmax()))
            logits[i].append(step_logits)
        chunks = [sequence[-1:] for sequence in tokens]
    for i, ids in enumerate(prompt_ids):
        with torch.inference_mode():
            generated = reference.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )
        assert tokens[i] == generated.sequences[0, len(ids):].tolist(), tokenizer.decode(ids)
        for step, (ours, ref) in enumerate(zip(logits[i], generated.logits)):
            assert relative_error(ours, ref[0]) <= LOGITS_RTOL, (tokenizer.decode(ids), step)
    assert "France" in tokenizer.decode(tokens[0])


def test_tokenizer_from_cache_equals_transformers(
    tokenizer: PreTrainedTokenizerFast, model: CausalLM, gguf_path: Path, cache_dir: Path
) -> None:
    tokenizer_cache = cache_dir / "tokenizers"
    (entry,) = [p for p in tokenizer_cache.iterdir() if not p.name.startswith(".")]  # the `tokenizer` fixture's
    assert json.loads((entry / "loraserve.json").read_text())["architecture"] == "gemma3"
    cached = gguf_loader.gguf_tokenizer(gguf_path, tokenizer_cache)  # a cache hit: loads the saved tokenizer.json
    converted = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    texts = [
        "Hello world", "  leading spaces\n\ttabs", "Straße 東京 🙂 naïve café", "Привет, мир", "<start_of_turn>user\nhi",
    ]
    for text in texts:
        ids = cached.encode(text)
        assert ids == converted.encode(text) == tokenizer.encode(text), text
        assert ids[0] == 2  # BOS
        assert cached.decode(ids[1:]) == converted.decode(ids[1:]) == text
    assert len(cached) == len(converted) == 262144
    assert cached.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    assert gguf_loader.eos_token_ids(model.config, cached) == {1, 106}  # <eos> and <end_of_turn>


def test_chat_template_renders_gemma_turns(tokenizer: PreTrainedTokenizerFast) -> None:
    render = tokenizer.apply_chat_template
    assert tokenizer.chat_template == gguf_loader.shipped_chat_template("gemma3")  # the file carries none
    messages = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
    ]
    assert render(messages, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert render([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], tokenize=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    )
    with pytest.raises(Exception, match="alternate"):
        render([{"role": "assistant", "content": "x"}], tokenize=False)


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match="llama"):
        gguf_loader.gguf_config(gguf_loader.read_gguf(path))


def test_default_model_file_is_reassembled_when_damaged(tmp_path: Path) -> None:
    path = default_model_path(tmp_path)
    intact = path.stat().st_size
    with path.open("r+b") as handle:  # as if a copy was interrupted or the file was edited
        handle.truncate(intact // 2)
    assert default_model_path(tmp_path) == path
    assert path.stat().st_size == intact
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no staging file left behind


def test_serve_with_no_model_argument_works_offline(cache_dir: Path, tokenizer: PreTrainedTokenizerFast,
                                                   tmp_path: Path) -> None:
    """The whole engine on the default model, in a fresh process that reuses the cached .gguf and tokenizer."""
    env = {"HF_HUB_OFFLINE": "1", "LORASERVE_CACHE": str(cache_dir)}
    with running_server([], tmp_path / "server.log", env=env, timeout=300, until_ready=False) as url:
        # the process answers while the model loads (about 10 s): 503 with a JSON body, as LoRAX while its shards load
        status, body = post_json(url + "/generate", {"inputs": "x"})
        assert status == 503 and body["error_type"] == "unhealthy", body
        deadline = time.monotonic() + 300
        while post_json(url + "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 1}})[0] == 503:
            assert time.monotonic() < deadline, "the model never finished loading"
            time.sleep(0.5)
        status, body = post_json(url + "/generate", {"inputs": "The capital of France is",
                                                     "parameters": {"max_new_tokens": 8, "details": True}})
        assert status == 200 and "France" in body["generated_text"]
        assert body["details"]["generated_tokens"] == 8
        status, body = post_json(url + "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}})
        assert status == 422 and body["error_type"] == "validation"
