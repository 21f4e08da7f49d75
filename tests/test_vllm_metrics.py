"""The `vllm:` gauges gateways route by (llm-d's endpoint picker, KServe, GKE), checked against the engine's state:
one request running on adapter A, one waiting on adapter B."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from server_process import running_server
from tiny_models import save_random_adapter, save_tiny_model, tiny_config


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        return {f.name: f for f in text_string_to_metric_families(response.read().decode())}


def _stream(url: str, adapter: Path, tokens: int):
    body = {"inputs": "Paris is", "parameters": {"adapter_id": str(adapter), "adapter_source": "local",
                                                 "max_new_tokens": tokens, "ignore_eos_token": True}}
    return urllib.request.urlopen(urllib.request.Request(
        url + "/generate_stream", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"}), timeout=60)


def test_vllm_gauges_follow_the_engine(tmp_path: Path) -> None:
    base_dir = save_tiny_model(tiny_config("llama"), tmp_path / "base")
    first = save_random_adapter(base_dir, tmp_path / "first", seed=1, r=8, lora_alpha=16, target_modules=["q_proj"])
    second = save_random_adapter(base_dir, tmp_path / "second", seed=2, r=4, lora_alpha=8, target_modules=["v_proj"])
    args = ["--model-id", str(base_dir), "--dtype", "float32", "--device", "cpu", "--max-running-requests", "1",
            "--max-total-tokens", "512", "--max-input-length", "64"]
    with running_server(args, tmp_path / "server.log") as url:
        running = _stream(url, first, 400)
        assert running.readline().startswith(b"data:")  # admitted and decoding
        waiting = _stream(url, second, 4)  # the one running slot is taken: it waits
        deadline = time.monotonic() + 30
        while (families := _scrape(url))["vllm:num_requests_waiting"].samples[0].value < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        running.close()
        waiting.close()
        with urllib.request.urlopen(url + "/info", timeout=30) as response:
            info = json.loads(response.read())

    def value(name: str, **labels: str) -> float:
        return next(s.value for s in families[name].samples if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("vllm:num_requests_running") == 1 and value("vllm:num_requests_waiting") == 1
    assert 0 < value("vllm:kv_cache_usage_perc") <= 1
    [cache] = families["vllm:cache_config_info"].samples
    assert int(cache.labels["block_size"]) * int(cache.labels["num_gpu_blocks"]) == info["max_batch_total_tokens"]
    [requests] = families["vllm:lora_requests_info"].samples
    assert requests.labels["running_lora_adapters"] == str(first)  # distinct sets: each request in one of them
    assert requests.labels["waiting_lora_adapters"] == str(second)
    assert requests.labels["max_lora"] == "1024" and abs(requests.value - time.time()) < 120
    loaded = {(s.labels["adapter_name"], s.labels["level"]): s.labels for s in families["vllm:lora_adapter_loaded"].samples}
    assert loaded[(str(first), "gpu")]["pinned"] == "true" and loaded[(str(first), "gpu")]["rank"] == "8"
    assert (str(second), "gpu") not in loaded and (str(second), "cpu") in loaded  # read, not yet admitted
    assert value("vllm:num_gpu_loaded_lora_adapters") == 1 and value("vllm:max_gpu_lora_adapters") == 1024
    load_count = next(s.value for s in families["vllm:lora_adapter_load_seconds"].samples if s.name.endswith("_count"))
    assert load_count == 2
