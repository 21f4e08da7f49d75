"""API keys and tenants over real HTTP: 401 without a key, another tenant's adapter is as missing, listings show
each caller only its own, and with keys on the Authorization header never reaches the Hub."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from hub_server import HubServer
from server_process import post_json, running_server
from tiny_models import save_random_adapter, save_tiny_model, tiny_config

ADMIN, ACME = "admin-key-1", "acme-key-2"


def _get(url: str, key: str | None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            body = response.read()
            return response.status, json.loads(body) if body.startswith((b"{", b"[")) else {}
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_keys_tenants_and_the_hub_token(tmp_path: Path) -> None:
    base_dir = save_tiny_model(tiny_config("llama"), tmp_path / "base")
    ours = save_random_adapter(base_dir, tmp_path / "acme" / "ours", seed=1, r=4, lora_alpha=8,
                               target_modules=["q_proj"])
    theirs = save_random_adapter(base_dir, tmp_path / "other" / "theirs", seed=2, r=4, lora_alpha=8,
                                 target_modules=["v_proj"])
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({"keys": [{"key": ACME, "tenant": "acme",
                                               "adapters": [str(tmp_path / "acme"), "acme/"]}]}))
    args = ["--model-id", str(base_dir), "--dtype", "float32", "--device", "cpu", "--api-key", ADMIN,
            "--api-keys-file", str(keys_file)]

    def generate(adapter: str, key: str | None, source: str = "local") -> tuple[int, dict]:
        body = {"inputs": "Paris is", "parameters": {"adapter_id": adapter, "adapter_source": source,
                                                     "max_new_tokens": 3, "ignore_eos_token": True}}
        return post_json(url + "/generate", body, headers={"Authorization": f"Bearer {key}"} if key else None)

    with HubServer() as hub:
        hub.add_repo("acme/hub-lora", ours)
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "LORASERVE_CACHE": str(tmp_path / "cache")}
        with running_server(args, tmp_path / "server.log", env=env) as url:
            assert _get(url + "/health", None)[0] == 200 and _get(url + "/metrics", None)[0] == 200
            for key in (None, "wrong-key"):
                status, reply = generate(str(ours), key)
                assert status == 401 and reply["error_type"] == "unauthorized" and "API key" in reply["error"]
            assert _get(url + "/adapters", None)[0] == 401
            bare = openai.OpenAI(base_url=url + "/v1", api_key="wrong-key", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bare.completions.create(model="", prompt="x", max_tokens=2)

            assert generate(str(ours), ADMIN)[0] == 200 and generate(str(theirs), ADMIN)[0] == 200
            assert generate(str(ours), ACME)[0] == 200
            status, reply = generate(str(theirs), ACME)  # another tenant's: exactly as a missing adapter
            missing_status, missing = generate(str(tmp_path / "acme" / "none"), ACME)
            assert status == missing_status == 424 and reply["error_type"] == missing["error_type"]
            assert "not found" in reply["error"]
            acme = openai.OpenAI(base_url=url + "/v1", api_key=ACME, max_retries=0)
            with pytest.raises(openai.NotFoundError):
                acme.completions.create(model=str(theirs), prompt="x", max_tokens=2,
                                        extra_body={"adapter_source": "local"})
            listed = {m.id for m in acme.models.list().data}
            assert str(ours) in listed and str(theirs) not in listed
            assert {a["adapter_id"] for a in _get(url + "/adapters", ACME)[1]["adapters"]} == {str(ours)}
            assert {a["adapter_id"] for a in _get(url + "/adapters", ADMIN)[1]["adapters"]} == {str(ours), str(theirs)}

            hub_calls = len(hub.requests)
            assert generate("acme/hub-lora", ACME, source="hub")[0] == 200
            assert len(hub.requests) > hub_calls  # it was fetched from the Hub...
            sent = {auth for _, _, auth in hub.requests}
            assert not any(auth and (ACME in auth or ADMIN in auth) for auth in sent)  # ...without our keys
    log = (tmp_path / "server.log").read_text()
    assert ACME not in log and ADMIN not in log
