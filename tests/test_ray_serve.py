"""Ray Serve: 2 replicas of a tiny model behind the adapter-affinity ingress, driven by the real PyPI clients.

One local Ray cluster (2 logical CPUs, no dashboard) for the module; every answer must equal the single-process
greedy tokens, and an adapter used by requests that do not overlap must live on exactly one replica.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from lorax import Client
from server_process import free_port
from tiny_models import save_random_adapter, save_tiny_chat_model

from loraserve.config import EngineConfig, ServerConfig
from loraserve.engine.llm import LLM
from loraserve.engine.request import AdapterRef
from loraserve.sampling.params import SamplingParams

ray = pytest.importorskip("ray", reason="the Ray Serve extra is not installed (pip install 'ray[serve]')")
serve = pytest.importorskip("ray.serve")
from loraserve.serving.ray_app import build_app  # noqa: E402 - needs ray

PROMPT = "Paris is the capital"
MESSAGES = [{"role": "user", "content": "Name a capital."}]
NEW_TOKENS = 8
ADAPTER_SHAPES = [  # (rank, alpha, targets): mixed ranks and target sets
    (2, 8, ["q_proj", "v_proj"]),
    (4, 16, ["q_proj", "o_proj", "up_proj"]),
    (8, 16, ["k_proj", "down_proj"]),
    (16, 32, ["gate_proj", "up_proj", "down_proj"]),
    (4, 4, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (8, 32, ["v_proj", "gate_proj"]),
    (2, 2, ["o_proj", "down_proj"]),
    (6, 12, ["q_proj", "v_proj", "up_proj"]),
]


def _config(base: Path) -> EngineConfig:
    return EngineConfig(model_id=str(base), dtype="float32", device="cpu", kv_cache_memory=8 << 20,
                        adapter_source="local")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("ray-serve")
    base = save_tiny_chat_model(root / "base")
    adapters = [save_random_adapter(base, root / f"adapter-{i}", seed=10 + i, r=r, lora_alpha=alpha,
                                    target_modules=targets)
                for i, (r, alpha, targets) in enumerate(ADAPTER_SHAPES)]
    return base, adapters


@pytest.fixture(scope="module")
def expected(dirs: tuple[Path, list[Path]]) -> dict:
    """Single-process greedy answers: per adapter (and None = base) for the raw prompt and for the chat prompt."""
    base, adapters = dirs
    llm = LLM(_config(base))
    tokenizer = llm.engine.tokenizer
    chat = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)
    names = [None, *map(str, adapters)]
    refs = [None if name is None else AdapterRef(name, "local") for name in names]
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    plain = llm.generate([PROMPT] * len(names), params, refs)
    chats = llm.generate([chat] * len(names), params, refs)
    answers = {name: {"text": p.text, "ids": p.token_ids, "chat": c.text} for name, p, c in zip(names, plain, chats)}
    assert all(answers[name]["ids"] != answers[None]["ids"] for name in names[1:]), "adapters must change the output"
    return {"answers": answers, "model_name": llm.engine.model_name}


@pytest.fixture(scope="module")
def url(dirs: tuple[Path, list[Path]], expected: dict) -> Iterator[str]:  # the offline answers first: less CPU contention
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 << 20,
             log_to_driver=False, logging_level=logging.WARNING)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(_config(dirs[0]), ServerConfig(), num_replicas=2, replica_num_cpus=0.5, torch_threads=1),
                  name="loraserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _placement(url: str) -> dict[str, set[str]]:
    """adapter id -> the replicas whose engine holds it (host or device tier)."""
    held: dict[str, set[str]] = {}
    for entry in _get(url + "/adapters")["adapters"]:
        if entry["tier"] in ("host", "device"):
            held.setdefault(entry["adapter_id"], set()).add(entry["replica_id"])
    return held


def _lorax(client: Client, adapter: str | None, stream: bool) -> tuple[str, list[int]]:
    options = dict(max_new_tokens=NEW_TOKENS, ignore_eos_token=True)
    if adapter is not None:
        options.update(adapter_id=adapter, adapter_source="local")
    if stream:
        events = list(client.generate_stream(PROMPT, **options))
        assert events[-1].details.finish_reason == "length"
        return "".join(e.token.text for e in events), [e.token.id for e in events]
    response = client.generate(PROMPT, **options)
    return response.generated_text, [t.id for t in response.details.tokens]


def _openai(client: openai.OpenAI, adapter: str | None, stream: bool, chat: bool = False) -> str:
    options = dict(model=adapter or "", max_tokens=NEW_TOKENS, temperature=0,
                   extra_body={"ignore_eos": True, **({"adapter_source": "local"} if adapter else {})})
    if chat:
        if stream:
            chunks = client.chat.completions.create(messages=MESSAGES, stream=True, **options)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(messages=MESSAGES, **options).choices[0].message.content
    if stream:
        return "".join(c.choices[0].text for c in client.completions.create(prompt=PROMPT, stream=True, **options))
    return client.completions.create(prompt=PROMPT, **options).choices[0].text


def test_routes_adapters_with_affinity_and_answers_exactly(url: str, dirs: tuple[Path, list[Path]],
                                                          expected: dict) -> None:
    answers = expected["answers"]
    adapters = [str(a) for a in dirs[1]]
    lorax = Client(url, timeout=60)
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert urllib.request.urlopen(url + "/health", timeout=30).status == 200
    assert _get(url + "/info")["model_id"]

    # the base model, both clients
    assert _lorax(lorax, None, stream=False) == (answers[None]["text"], answers[None]["ids"])
    assert _openai(oai, None, stream=True) == answers[None]["text"]

    # sequential requests over 8 adapters: LoRAX for the first four, OpenAI for the rest, plain then streamed
    for i, adapter in enumerate(adapters):
        want = answers[adapter]
        if i < 4:
            assert _lorax(lorax, adapter, stream=False) == (want["text"], want["ids"]), adapter
            assert _lorax(lorax, adapter, stream=True) == (want["text"], want["ids"]), adapter
        else:
            assert _openai(oai, adapter, stream=False) == want["text"], adapter
            assert _openai(oai, adapter, stream=True) == want["text"], adapter
            assert _openai(oai, adapter, stream=i % 2 == 0, chat=True) == want["chat"], adapter
    held = _placement(url)
    assert {a: len(held.get(a, ())) for a in adapters} == {a: 1 for a in adapters}, held
    assert len(set().union(*held.values())) == 2, f"new adapters go to the replica holding fewer: {held}"
    replicas = _get(url + "/adapters")["replicas"]
    assert sorted(k for r in replicas for k in r["multiplexed_ids"]) == sorted(f"local:{a}" for a in adapters)
    owner = {a: next(iter(held[a])) for a in adapters}

    # a second round, concurrent, streamed and not, mixed with the base model: same tokens, same replicas
    jobs = [(a, s) for a in [*adapters, None] for s in (False, True)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: _lorax(lorax, *job), jobs))
    for (adapter, _), result in zip(jobs, results):
        assert result == (answers[adapter]["text"], answers[adapter]["ids"]), adapter
    held = _placement(url)
    assert {a: next(iter(held[a])) for a in adapters} == owner and all(len(held[a]) == 1 for a in adapters)


def test_errors_models_and_names_across_replicas(url: str, dirs: tuple[Path, list[Path]], expected: dict) -> None:
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):  # the replica's own error passes through the ingress
        oai.completions.create(model=str(dirs[0] / "no-such-adapter"), prompt="x", max_tokens=2,
                               extra_body={"adapter_source": "local"})
    # vLLM's runtime registration reaches every replica, so the name works wherever the request lands
    request = urllib.request.Request(url + "/v1/load_lora_adapter", method="POST",
                                     data=json.dumps({"lora_name": "named", "lora_path": str(dirs[1][0])}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and b"named" in response.read()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        named = [e for e in _get(url + "/adapters")["adapters"] if "named" in e["names"]]
        if len({e["replica_id"] for e in named}) == 2:
            break
        time.sleep(0.1)
    assert len({e["replica_id"] for e in named}) == 2, named
    assert _openai(oai, "named", stream=False) == expected["answers"][str(dirs[1][0])]["text"]
    assert expected["model_name"] in [m.id for m in oai.models.list().data]
