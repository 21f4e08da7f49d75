"""Adapters over HTTP: `adapter_id` from the Hub stand-in, the per-request token rules, and a 424 for a bad adapter."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from hub_server import HubServer
from server_process import post_json, running_server
from tiny_models import save_random_adapter, save_tiny_model, tiny_config

from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.engine.request import AdapterRef
from loraserve.sampling.params import SamplingParams

TOKEN = "hf_private_adapter_token"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base_dir = save_tiny_model(tiny_config("qwen2"), root / "base")
    save_random_adapter(base_dir, root / "adapter", seed=0, r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])
    return base_dir, root / "adapter"


def test_adapters_from_the_hub_with_per_request_tokens(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, adapter_dir = dirs
    expected = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu")).generate(
        ["Paris is"], SamplingParams(max_new_tokens=10, ignore_eos=True), [AdapterRef(str(adapter_dir), "local")]
    )[0]
    body = {"inputs": "Paris is", "parameters": {"max_new_tokens": 10, "ignore_eos_token": True, "details": True}}
    with HubServer() as hub:
        hub.add_repo("acme/public-lora", adapter_dir)
        hub.add_repo("acme/private-lora", adapter_dir, token=TOKEN)
        hub.add_repo("acme/private-lora-2", adapter_dir, token=TOKEN)
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "LORASERVE_CACHE": str(tmp_path / "cache"),
               "HF_TOKEN": "server-token-never-lent"}
        args = ["--model-id", str(base_dir), "--dtype", "float32", "--device", "cpu"]
        with running_server(args, tmp_path / "server.log", env=env) as url:
            public = {**body, "parameters": {**body["parameters"], "adapter_id": "acme/public-lora"}}
            status, reply = post_json(url + "/generate", public)
            assert status == 200, reply
            assert [t["id"] for t in reply["details"]["tokens"]] == expected.token_ids

            private = {**body, "parameters": {**body["parameters"], "adapter_id": "acme/private-lora"}}
            status, reply = post_json(url + "/generate", private)
            assert status == 424 and reply["error_type"] == "generation" and "acme/private-lora" in reply["error"]
            assert "Bearer server-token-never-lent" not in {auth for _, _, auth in hub.requests}

            with_token = {**body, "parameters": {**private["parameters"], "api_token": TOKEN}}
            status, reply = post_json(url + "/generate", with_token)
            assert status == 200, reply
            assert [t["id"] for t in reply["details"]["tokens"]] == expected.token_ids
            # now in memory, yet still refused to a request whose token cannot reach it on the Hub
            wrong_token = {**body, "parameters": {**private["parameters"], "api_token": "hf_someone_else"}}
            for attempt in (private, wrong_token):
                status, reply = post_json(url + "/generate", attempt)
                assert status == 424 and "acme/private-lora" in reply["error"], reply
            status, reply = post_json(url + "/generate", with_token)  # the owner's token still works
            assert status == 200, reply

            second = {**body, "parameters": {**body["parameters"], "adapter_id": "acme/private-lora-2"}}
            status, reply = post_json(url + "/generate", second, headers={"Authorization": f"Bearer {TOKEN}"})
            assert status == 200, reply  # the header's token is used when the body carries none
            assert any(auth == f"Bearer {TOKEN}" for _, path, auth in hub.requests if "private-lora-2" in path)

            local = {**body, "parameters": {**body["parameters"], "adapter_id": str(adapter_dir),
                                            "adapter_source": "local"}}
            status, reply = post_json(url + "/generate", local)
            assert status == 200 and [t["id"] for t in reply["details"]["tokens"]] == expected.token_ids
            merged = {**body, "parameters": {**body["parameters"], "adapter_source": "local", "merged_adapters": {
                "ids": [str(adapter_dir)], "weights": [1.0], "merge_strategy": "linear"}}}
            status, reply = post_json(url + "/generate", merged)  # a merge of one adapter at weight 1 is itself
            assert status == 200 and [t["id"] for t in reply["details"]["tokens"]] == expected.token_ids
            merged["parameters"]["merged_adapters"]["weights"] = [1.0, 2.0]
            status, reply = post_json(url + "/generate", merged)
            assert status == 422 and "1 ids but 2 weights" in reply["error"]
            status, reply = post_json(url + "/generate", {**body, "parameters": {"adapter_id": "x",
                                                                                 "adapter_source": "ftp"}})
            assert status == 422 and reply["error_type"] == "validation"
            status, reply = post_json(url + "/generate", body)  # the base model still serves
            assert status == 200 and [t["id"] for t in reply["details"]["tokens"]] != expected.token_ids


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_adapter_inventory_preload_and_unload(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, adapter_dir = dirs
    with HubServer() as hub:
        hub.add_repo("acme/public-lora", adapter_dir)
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "LORASERVE_CACHE": str(tmp_path / "cache")}
        args = ["--model-id", str(base_dir), "--dtype", "float32", "--device", "cpu", "--max-active-adapters", "2"]
        with running_server(args, tmp_path / "server.log", env=env) as url:
            assert _get_json(url + "/adapters")["adapters"] == []
            status, reply = post_json(url + "/adapters/preload", {"adapter_id": "acme/public-lora"})
            assert status == 200 and reply["tier"] == "device", reply
            [info] = _get_json(url + "/adapters")["adapters"]
            assert (info["adapter_id"], info["source"], info["tier"], info["rank"]) == ("acme/public-lora", "hub",
                                                                                       "device", 8)
            hub_requests = len(hub.requests)
            body = {"inputs": "Paris is", "parameters": {"max_new_tokens": 4, "adapter_id": "acme/public-lora"}}
            assert post_json(url + "/generate", body)[0] == 200
            assert len(hub.requests) == hub_requests  # preloaded: the request fetched nothing

            # a request in flight holds its adapter: unloading it is refused until the request ends
            stream = urllib.request.urlopen(urllib.request.Request(
                url + "/generate_stream", method="POST", headers={"Content-Type": "application/json"},
                data=json.dumps({"inputs": "Paris is", "parameters": {
                    "max_new_tokens": 480, "ignore_eos_token": True, "adapter_id": "acme/public-lora"}}).encode()),
                timeout=60)
            assert stream.readline().startswith(b"data:")
            status, reply = post_json(url + "/adapters/unload", {"adapter_id": "acme/public-lora"})
            assert status == 409 and reply["error_type"] == "conflict", reply
            stream.close()

            deadline = time.monotonic() + 30
            while (status := post_json(url + "/adapters/unload", {"adapter_id": "acme/public-lora"})[0]) == 409:
                assert time.monotonic() < deadline, "the aborted stream never released its adapter"
                time.sleep(0.1)
            assert status == 200
            [info] = _get_json(url + "/adapters")["adapters"]
            assert info["tier"] == "disk" and info["size_bytes"] > 0  # the download stays in the cache
            status, reply = post_json(url + "/adapters/unload", {"adapter_id": "acme/public-lora"})
            assert status == 404 and reply["error_type"] == "not_found"
            models = [m["id"] for m in _get_json(url + "/v1/models")["data"]]
            assert models == [str(base_dir), "acme/public-lora"]
