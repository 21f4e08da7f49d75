"""Adapters as operators name them: `--adapter-source`, `--lora-modules`, vLLM's load/unload routes, through the
unmodified `openai` SDK with no `extra_body`, and raw HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_process import post_json, running_server
from tiny_models import save_random_adapter, save_tiny_chat_model

from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.engine.request import AdapterRef
from loraserve.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("names")
    base_dir = save_tiny_chat_model(root / "base")
    save_random_adapter(base_dir, root / "sql", seed=3, r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    save_random_adapter(base_dir, root / "chat", seed=4, r=32, lora_alpha=32, target_modules=["gate_proj", "o_proj"])
    return base_dir, root / "sql", root / "chat"


@pytest.fixture(scope="module")
def url(dirs: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    args = ["--model-id", str(dirs[0]), "--dtype", "float32", "--device", "cpu", "--adapter-source", "local",
            "--lora-modules", f"sql={dirs[1]}"]
    with running_server(args, log) as base_url:
        yield base_url


def _expected(dirs: tuple[Path, Path, Path], adapter: Path | None, prompt: str) -> str:
    llm = LLM(EngineConfig(model_id=str(dirs[0]), dtype="float32", device="cpu"))
    ref = AdapterRef(str(adapter), "local") if adapter is not None else None
    return llm.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True), [ref])[0].text


def _post_text(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_names_and_the_default_source_reach_adapters_without_extra_body(url: str,
                                                                       dirs: tuple[Path, Path, Path]) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    extra = {"ignore_eos": True}
    by_name = client.completions.create(model="sql", prompt="Paris is", max_tokens=6, extra_body=extra)
    by_path = client.completions.create(model=str(dirs[1]), prompt="Paris is", max_tokens=6, extra_body=extra)
    expected = _expected(dirs, dirs[1], "Paris is")
    assert by_name.choices[0].text == by_path.choices[0].text == expected
    assert expected != _expected(dirs, None, "Paris is")  # the adapter matters
    # LoRAX's route takes the name as adapter_id too, at the default source
    status, reply = post_json(url + "/generate", {"inputs": "Paris is", "parameters": {
        "adapter_id": "sql", "max_new_tokens": 6, "ignore_eos_token": True}})
    assert status == 200 and reply["generated_text"] == expected
    models = {m.id: m for m in client.models.list().data}
    assert models["sql"].parent == models[str(dirs[0])].id and models["sql"].root == str(dirs[1])


def test_load_use_unload_and_404_after(url: str, dirs: tuple[Path, Path, Path]) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    status, text = _post_text(url + "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": str(dirs[2])})
    assert status == 200 and "added successfully" in text, text
    status, reply = post_json(url + "/v1/load_lora_adapter", {"lora_name": "chat", "lora_path": str(dirs[2])})
    assert status == 400 and "already been loaded" in reply["error"]["message"]
    [loaded] = [a for a in _get(url + "/adapters")["adapters"] if "chat" in a["names"]]
    assert loaded["tier"] == "device" and loaded["rank"] == 32
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.model == "chat" and reply.choices[0].message.content is not None
    assert "chat" in {m.id for m in client.models.list().data}
    before = _get(url + "/adapters")["device_bytes"]

    status, text = _post_text(url + "/v1/unload_lora_adapter", {"lora_name": "chat"})
    assert status == 200 and "removed successfully" in text, text
    inventory = _get(url + "/adapters")
    assert inventory["device_bytes"] == before - loaded["size_bytes"]  # the memory really left
    assert all("chat" not in a["names"] for a in inventory["adapters"])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="chat", prompt="x", max_tokens=2)
    status, reply = post_json(url + "/v1/unload_lora_adapter", {"lora_name": "chat"})
    assert status == 404, reply
    status, reply = post_json(url + "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": "/no/such/dir"})
    assert status == 404, reply
    with pytest.raises(openai.NotFoundError):  # a failed load leaves no name behind
        client.completions.create(model="broken", prompt="x", max_tokens=2)


def test_unload_is_refused_while_a_request_uses_the_adapter(url: str, dirs: tuple[Path, Path, Path]) -> None:
    status, _ = _post_text(url + "/v1/load_lora_adapter", {"lora_name": "busy", "lora_path": str(dirs[2])})
    assert status == 200
    stream = urllib.request.urlopen(urllib.request.Request(
        url + "/generate_stream", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"inputs": "Paris is", "parameters": {
            "max_new_tokens": 100, "ignore_eos_token": True, "adapter_id": "busy"}}).encode()), timeout=60)
    try:
        assert stream.readline().startswith(b"data:")
        status, reply = post_json(url + "/v1/unload_lora_adapter", {"lora_name": "busy"})
        assert status == 409 and "request" in reply["error"]["message"], reply
    finally:
        stream.close()


def test_chat_with_an_adapter_on_a_server_without_lora_is_a_422(dirs: tuple[Path, Path, Path],
                                                                tmp_path: Path) -> None:
    args = ["--model-id", str(dirs[0]), "--dtype", "float32", "--device", "cpu", "--max-active-adapters", "0"]
    with running_server(args, tmp_path / "server.log") as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
        for call in (lambda: client.chat.completions.create(model=str(dirs[1]), max_tokens=2,
                                                            messages=[{"role": "user", "content": "Hi"}]),
                     lambda: client.completions.create(model=str(dirs[1]), prompt="x", max_tokens=2)):
            with pytest.raises(openai.UnprocessableEntityError, match="without LoRA"):
                call()
        assert [m.id for m in client.models.list().data] == [str(dirs[0])]
