"""`loraserve serve` over real HTTP on loopback: /generate greedy and sampled, against the offline engine."""

from __future__ import annotations

import concurrent.futures
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import post_json, running_server
from tiny_models import save_tiny_model, tiny_config

from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.sampling.params import SamplingParams

ENGINE_FLAGS = ["--dtype", "float32", "--device", "cpu", "--max-input-length", "64", "--max-total-tokens", "128"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tiny_config("qwen2"), tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(["--model-id", str(model_dir), *ENGINE_FLAGS], log) as url:
        yield url


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> LLM:
    return LLM(EngineConfig(model_id=str(model_dir), dtype="float32", device="cpu", max_input_length=64,
                            max_total_tokens=128))


def test_generate_greedy_matches_offline_engine(server: str, offline: LLM) -> None:
    expected = offline.generate(["The quick brown fox"], SamplingParams(max_new_tokens=12))[0]
    status, body = post_json(server + "/generate", {
        "inputs": "The quick brown fox", "parameters": {"max_new_tokens": 12, "details": True},
    })
    assert status == 200
    assert body["generated_text"] == expected.text
    assert [t["id"] for t in body["details"]["tokens"]] == expected.token_ids
    assert body["details"]["finish_reason"] == expected.finish_reason.value
    assert body["details"]["generated_tokens"] == len(expected.tokens)


def test_generate_sampled_with_seed_is_reproducible_under_concurrency(server: str, offline: LLM) -> None:
    params = {"max_new_tokens": 16, "do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 42, "details": True}
    expected = offline.generate(
        ["Once upon a time"], SamplingParams(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, seed=42)
    )[0]
    bodies = [{"inputs": "Once upon a time", "parameters": params}] + [
        {"inputs": f"Paris {i}", "parameters": {"max_new_tokens": 8 + i, "do_sample": True}} for i in range(5)
    ]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: post_json(server + "/generate", b), bodies))
    assert all(status == 200 for status, _ in results)
    assert [t["id"] for t in results[0][1]["details"]["tokens"]] == expected.token_ids


def test_generate_rejects_a_too_long_request(server: str) -> None:
    status, body = post_json(server + "/generate", {"inputs": "word " * 200, "parameters": {"max_new_tokens": 4}})
    assert status == 422
    assert body["error_type"] == "validation" and "inputs" in body["error"]
    status, body = post_json(server + "/generate", {"parameters": {"max_new_tokens": 4}})
    assert status == 422 and body["error_type"] == "validation"


def test_over_max_concurrent_requests_answers_429_at_once(model_dir: Path, tmp_path: Path) -> None:
    args = ["--model-id", str(model_dir), *ENGINE_FLAGS, "--max-concurrent-requests", "1"]
    with running_server(args, tmp_path / "server.log") as url:
        body = json.dumps({"inputs": "Once", "parameters": {"max_new_tokens": 100, "ignore_eos_token": True}})
        stream = urllib.request.urlopen(urllib.request.Request(
            url + "/generate_stream", data=body.encode(), headers={"Content-Type": "application/json"}))
        first_event = stream.readline()
        assert first_event.startswith(b"data:{")
        status, reply = post_json(url + "/generate", {"inputs": "Paris", "parameters": {"max_new_tokens": 2}})
        assert status == 429 and reply == {"error": "Model is overloaded", "error_type": "overloaded"}
        events = [line for line in stream.read().split(b"\n") if line.startswith(b"data:")]
        stream.close()
        assert len(events) == 99  # the stream in flight was not disturbed
        status, _ = post_json(url + "/generate", {"inputs": "Paris", "parameters": {"max_new_tokens": 2}})
        assert status == 200


def test_metrics_are_prometheus_text_and_count_requests(server: str) -> None:
    status, _ = post_json(server + "/generate", {"inputs": "Paris", "parameters": {"max_new_tokens": 3,
                                                                                   "ignore_eos_token": True}})
    assert status == 200
    with urllib.request.urlopen(server + "/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    ttft = families["loraserve:time_to_first_token_seconds"]
    assert sum(s.value for s in ttft.samples if s.name.endswith("_count")) >= 1
    generated = families["loraserve:generation_tokens"]
    assert sum(s.value for s in generated.samples if s.name.endswith("_total")) >= 3
    for name in ("loraserve:num_requests_running", "loraserve:num_requests_waiting", "loraserve:kv_cache_usage_perc",
                 "loraserve:e2e_request_latency_seconds", "loraserve:request_success", "loraserve:lora_requests_info",
                 "loraserve:request_queue_time_seconds", "loraserve:request_inference_time_seconds",
                 "loraserve:adapter_host_loads", "loraserve:adapter_device_evictions", "loraserve:adapters_on_device"):
        assert name in families, name
    queue = families["loraserve:request_queue_time_seconds"]
    assert sum(s.value for s in queue.samples if s.name.endswith("_count")) >= 1


def test_generate_sends_lorax_headers_and_prefill_details(server: str, offline: LLM) -> None:
    body = {"inputs": "Paris is the capital", "parameters": {"max_new_tokens": 5, "ignore_eos_token": True,
                                                             "details": True, "decoder_input_details": True}}
    request = urllib.request.Request(server + "/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        headers = response.headers
        reply = json.loads(response.read())
    ids = offline.engine.tokenizer.encode(body["inputs"])
    assert headers["x-prompt-tokens"] == str(len(ids)) and headers["x-generated-tokens"] == "5"
    assert headers["x-total-tokens"] == str(len(ids) + 5) and headers["x-compute-type"] == "cpu"
    assert headers["x-compute-characters"] == str(len(body["inputs"]))
    total, queue, inference = (float(headers[h]) for h in ("x-total-time", "x-queue-time", "x-inference-time"))
    assert 0 <= queue <= total and 0 < inference <= total
    assert 0 < float(headers["x-time-to-first-token"]) <= total
    prefill = reply["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids and prefill[0].get("logprob") is None
    expected = offline.generate([body["inputs"]], SamplingParams(max_new_tokens=1, prompt_logprobs=0))[0]
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx([lp for _, lp, _ in expected.prompt_logprobs],
                                                                abs=1e-5)


def test_tokenize_gives_ids_and_character_offsets(server: str, offline: LLM) -> None:
    text = "Straße, café du monde"
    status, reply = post_json(server + "/tokenize", {"inputs": text})
    assert status == 200
    assert [t["id"] for t in reply] == offline.engine.tokenizer.encode(text)
    assert "".join(t["text"] for t in reply) == text
    assert all(text[t["start"]:t["stop"]] == t["text"] for t in reply)


def test_a_model_that_cannot_load_ends_the_process(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="server exited with 1"):
        with running_server(["--model-id", str(tmp_path / "no-such-model"), *ENGINE_FLAGS], tmp_path / "server.log"):
            pass
    assert "loading the model failed" in (tmp_path / "server.log").read_text()
