"""Every request limit over real HTTP: 422 with a JSON body whose message names the flag; per-tenant rate limits
(429 with Retry-After, then recovery); and the smaller defects of issue 15 (non-Latin-1 adapter ids in headers, lone
surrogates, `max_tokens: 0`, `truncate`, errors without server paths or Hub URLs, a bounded failure memory)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from server_process import post_json, running_server
from tiny_models import save_random_adapter, save_tiny_chat_model
from transformers import AutoTokenizer

from loraserve.adapters.cache import HostAdapterCache
from loraserve.adapters.registry import AdapterKey
from loraserve.errors import AdapterNotFound
from loraserve.server.rate_limit import TokenBuckets

LIMIT_FLAGS = ["--max-input-length", "64", "--max-total-tokens", "96", "--max-stop-sequences", "2",
               "--max-stop-sequence-length", "8", "--max-best-of", "3", "--max-n", "2", "--max-merged-adapters", "2",
               "--max-json-schema-bytes", "200", "--max-json-schema-depth", "4", "--max-regex-length", "16"]
CLOSED_HUB = "http://127.0.0.1:9"  # nothing listens: every Hub call fails at once
UNICODE_ADAPTER = "адаптер-東京"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def adapter_root(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    save_random_adapter(model_dir, root / UNICODE_ADAPTER, seed=0, r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj"])
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    return root


@pytest.fixture(scope="module")
def server(model_dir: Path, adapter_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    args = ["--model-id", str(model_dir), "--dtype", "float32", "--device", "cpu", "--adapter-root",
            str(adapter_root), *LIMIT_FLAGS]
    with running_server(args, log, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": CLOSED_HUB}) as url:
        yield url


def _message(reply: dict) -> str:
    """The error message of LoRAX's body (`error` is the text) or OpenAI's (`error.message`)."""
    return reply["error"] if isinstance(reply["error"], str) else reply["error"]["message"]


def _refused(url: str, body: dict, naming: str, status: int = 422) -> dict:
    code, reply = post_json(url, body)
    assert code == status, (code, reply)
    assert naming in _message(reply), reply
    return reply


def _generate(url: str, inputs: str = "Paris is", **parameters: object) -> dict:
    return {"inputs": inputs, "parameters": parameters}


def _chat(**fields: object) -> dict:
    return {"messages": [{"role": "user", "content": "Hello"}], **fields}


def test_prompt_and_total_tokens_name_their_flags(server: str) -> None:
    long = "word " * 100
    reply = _refused(server + "/generate", _generate(server, long, max_new_tokens=2), "--max-input-length")
    assert reply["error_type"] == "validation"
    reply = _refused(server + "/v1/completions", {"prompt": long, "max_tokens": 2}, "--max-input-length")
    assert reply["error"]["code"] == 422
    _refused(server + "/generate", _generate(server, max_new_tokens=100), "--max-total-tokens")
    _refused(server + "/v1/chat/completions", _chat(max_tokens=90), "--max-total-tokens")


def test_n_is_bounded_by_max_n(server: str) -> None:
    _refused(server + "/v1/completions", {"prompt": "Paris is", "max_tokens": 2, "n": 3}, "--max-n")
    status, reply = post_json(server + "/v1/completions", {"prompt": "Paris is", "max_tokens": 2, "n": 2})
    assert status == 200 and len(reply["choices"]) == 2


def test_best_of_samples_and_returns_the_likeliest(server: str) -> None:
    status, reply = post_json(server + "/generate", _generate(server, best_of=3, do_sample=True, max_new_tokens=6,
                                                              ignore_eos_token=True, details=True))
    assert status == 200, reply
    details = reply["details"]
    others = details["best_of_sequences"]
    assert len(others) == 2

    def mean(tokens: list[dict]) -> float:
        return sum(t["logprob"] for t in tokens) / len(tokens)

    assert all(mean(details["tokens"]) >= mean(other["tokens"]) for other in others)
    assert reply["generated_text"] == "".join(t["text"] for t in details["tokens"])

    _refused(server + "/generate", _generate(server, best_of=4, do_sample=True), "--max-best-of")
    _refused(server + "/generate", _generate(server, best_of=2), "sampling")
    _refused(server + "/generate", _generate(server, best_of=2, do_sample=True, seed=1), "`seed`")
    _refused(server + "/generate_stream", _generate(server, best_of=2, do_sample=True), "streaming")


def test_stop_sequences_are_bounded_in_count_and_length(server: str) -> None:
    _refused(server + "/generate", _generate(server, stop=["a", "b", "c"]), "--max-stop-sequences")
    _refused(server + "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c"]}, "--max-stop-sequences")
    _refused(server + "/generate", _generate(server, stop=["123456789"]), "--max-stop-sequence-length")
    _refused(server + "/v1/chat/completions", _chat(stop="123456789"), "--max-stop-sequence-length")
    status, _ = post_json(server + "/generate", _generate(server, stop=["a", "12345678"], max_new_tokens=2))
    assert status == 200


def test_merged_adapters_are_bounded(server: str) -> None:
    merge = {"ids": ["a", "b", "c"], "weights": [1.0, 1.0, 1.0]}
    _refused(server + "/generate", _generate(server, merged_adapters=merge), "--max-merged-adapters")


def test_constrained_decoding_inputs_are_bounded(server: str) -> None:
    deep = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}
    wide = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(10)}}
    for path, make in (("/generate", lambda f: _generate(server, response_format=f, max_new_tokens=4)),
                       ("/v1/chat/completions", lambda f: _chat(response_format=f, max_tokens=4))):
        _refused(server + path, make({"type": "json_schema", "schema": deep}), "--max-json-schema-depth")
        _refused(server + path, make({"type": "json_schema", "schema": wide}), "--max-json-schema-bytes")
        _refused(server + path, make({"type": "regex", "pattern": "[a-z]{1,3}" * 2}), "--max-regex-length")
        status, reply = post_json(server + path, make({"type": "regex", "pattern": "[a-z]{1,3}"}))
        assert status == 200, reply


def test_token_ids_outside_the_vocabulary_are_refused(server: str) -> None:
    for prompt in ([2, 10**6], [-1]):
        _refused(server + "/v1/completions", {"prompt": prompt, "max_tokens": 2}, "token ids must be in")


def test_truncate_keeps_the_last_prompt_tokens(server: str, model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    long = "Once upon a time there was a small model that answered questions about adapters. " * 4
    plain = tokenizer.encode(long, add_special_tokens=False)
    assert len(plain) > 64  # over --max-input-length: only truncation lets it in
    status, reply = post_json(server + "/generate", _generate(server, long, truncate=6, max_new_tokens=2,
                                                              details=True, decoder_input_details=True))
    assert status == 200, reply
    assert reply["details"]["prompt_tokens"] == 6
    assert [t["id"] for t in reply["details"]["prefill"]] == [tokenizer.bos_token_id, *plain[-5:]]
    _refused(server + "/generate", _generate(server, long, truncate=65), "--max-input-length")
    _refused(server + "/generate", _generate(server, long, truncate=0), "`truncate`")


def test_max_tokens_zero_is_refused_as_openai_does(server: str) -> None:
    _refused(server + "/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens")
    _refused(server + "/v1/chat/completions", _chat(max_completion_tokens=0), "max_completion_tokens")


def test_a_lone_surrogate_is_a_422(server: str) -> None:
    # json.dumps writes the surrogate as the escape `\ud800`: valid JSON, invalid Unicode
    _refused(server + "/generate", _generate(server, "Paris \ud800"), "inputs")
    _refused(server + "/tokenize", {"inputs": "\ud800"}, "inputs")
    _refused(server + "/v1/completions", {"prompt": "x", "stop": ["\ud800"]}, "stop.0")
    _refused(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]},
             "messages.0.content")


def _post_with_headers(url: str, body: dict) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, dict(response.headers), response.read()


def test_a_non_latin1_adapter_id_is_percent_encoded_in_the_headers(server: str) -> None:
    body = _generate(server, adapter_id=UNICODE_ADAPTER, adapter_source="local", max_new_tokens=3)
    for path in ("/generate", "/generate_stream"):
        status, headers, _ = _post_with_headers(server + path, body)
        assert status == 200
        assert headers["x-adapter-id"].isascii() and unquote(headers["x-adapter-id"]) == UNICODE_ADAPTER


def test_adapter_errors_name_no_server_path_nor_hub_url(server: str, adapter_root: Path) -> None:
    requests = [("/generate", _generate(server, adapter_id=name, adapter_source=source, max_new_tokens=2))
                for name, source in (("broken", "local"), ("missing", "local"), ("acme/lora", "hub"))]
    requests += [("/v1/completions", {"model": "acme/lora", "prompt": "x", "max_tokens": 2}),
                 ("/adapters/preload", {"adapter_id": "broken", "adapter_source": "local"})]
    for path, body in requests:
        status, reply = post_json(server + path, body)
        assert status in (404, 424), reply
        text = json.dumps(reply)
        assert str(adapter_root) not in text and "127.0.0.1" not in text and "http" not in text, reply


def test_the_adapter_failure_memory_is_bounded(tmp_path: Path) -> None:
    now = [0.0]
    cache = HostAdapterCache({}, torch.float32, tmp_path, None, 1 << 20, failure_ttl=30.0, clock=lambda: now[0])
    for i in range(50):  # a client naming made-up adapters, each failure remembered
        with pytest.raises(AdapterNotFound):
            cache.get(AdapterKey("local", str(tmp_path / f"missing-{i}")), None)
    assert len(cache._failures) == 50
    now[0] += 31.0  # past the TTL: the next failure prunes every expired one
    with pytest.raises(AdapterNotFound):
        cache.get(AdapterKey("local", str(tmp_path / "missing-last")), None)
    assert len(cache._failures) == 1
    cache._failures.limit = 8  # and a count bound, whatever the TTL
    for i in range(20):
        with pytest.raises(AdapterNotFound):
            cache.get(AdapterKey("local", str(tmp_path / f"again-{i}")), None)
    assert len(cache._failures) == 8


def test_token_buckets_forget_callers_that_refilled() -> None:
    now = [0.0]
    buckets = TokenBuckets(per_minute=60, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(1.0)  # a token a second; a refusal spends nothing
    now[0] += 0.5
    assert buckets.take("a") == pytest.approx(0.5)
    for caller in range(100):
        buckets.take(f"client-{caller}")
    assert len(buckets) == 101
    now[0] += 3.0  # every bucket has refilled
    assert buckets.take("late") == 0.0 and len(buckets) == 1


def _call(url: str, key: str, body: dict | None = None) -> tuple[int, Message, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def test_rate_limit_per_tenant_answers_429_with_retry_after_and_recovers(model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "acme-1", "tenant": "acme"}, {"key": "acme-2", "tenant": "acme"},
                                         {"key": "globex-1", "tenant": "globex"}]}))
    args = ["--model-id", str(model_dir), "--dtype", "float32", "--device", "cpu", "--api-keys-file", str(keys),
            "--rate-limit-per-minute", "30", "--rate-limit-burst", "2"]
    with running_server(args, tmp_path / "server.log") as url:
        tokenize = {"inputs": "Paris"}
        assert _call(url + "/tokenize", "acme-1", tokenize)[0] == 200
        assert _call(url + "/tokenize", "acme-2", tokenize)[0] == 200  # one bucket for the tenant's keys
        status, headers, reply = _call(url + "/v1/models", "acme-1")
        assert status == 429 and reply["error"]["type"] == "rate_limit_exceeded", reply
        assert "--rate-limit-per-minute" in reply["error"]["message"]
        status, headers, reply = _call(url + "/tokenize", "acme-2", tokenize)
        assert status == 429 and reply["error_type"] == "rate_limit_exceeded"
        assert "--rate-limit-per-minute" in reply["error"]
        retry_after = int(headers["Retry-After"])
        assert 1 <= retry_after <= 2  # one token every 2 s
        assert _call(url + "/tokenize", "globex-1", tokenize)[0] == 200  # another tenant is not held up
        for _ in range(5):
            with urllib.request.urlopen(url + "/health", timeout=10) as response:
                assert response.status == 200  # probes are never limited
        time.sleep(retry_after)
        assert _call(url + "/tokenize", "acme-1", tokenize)[0] == 200
