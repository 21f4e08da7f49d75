"""The unmodified PyPI `lorax-client` (0.6.3, installed with --no-deps) against a real server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from lorax import AsyncClient, Client
from server_process import running_server
from tiny_models import save_random_adapter, save_tiny_model, tiny_config

from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.engine.request import AdapterRef
from loraserve.sampling.params import SamplingParams

PROMPT = "Paris is the capital"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lorax-client")
    base_dir = save_tiny_model(tiny_config("mistral"), root / "base")
    adapter = save_random_adapter(base_dir, root / "adapter", seed=1, r=4, lora_alpha=16,
                                  target_modules=["q_proj", "o_proj", "up_proj"])
    return base_dir, adapter


@pytest.fixture(scope="module")
def server(dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(["--model-id", str(dirs[0]), "--dtype", "float32", "--device", "cpu"], log) as url:
        yield url


@pytest.fixture(scope="module")
def expected(dirs: tuple[Path, Path]) -> tuple[str, list[int]]:
    result = LLM(EngineConfig(model_id=str(dirs[0]), dtype="float32", device="cpu")).generate(
        [PROMPT], SamplingParams(max_new_tokens=10, ignore_eos=True), [AdapterRef(str(dirs[1]), "local")]
    )[0]
    return result.text, result.token_ids


def test_client_generate_and_stream_with_an_adapter(server: str, dirs: tuple[Path, Path], expected) -> None:
    client = Client(server)
    options = dict(adapter_id=str(dirs[1]), adapter_source="local", max_new_tokens=10, ignore_eos_token=True)
    response = client.generate(PROMPT, **options)
    assert response.generated_text == expected[0]
    assert [t.id for t in response.details.tokens] == expected[1]
    assert response.details.finish_reason == "length" and response.details.generated_tokens == 10
    events = list(client.generate_stream(PROMPT, **options))
    assert "".join(e.token.text for e in events) == expected[0]
    assert [e.token.id for e in events] == expected[1]
    assert events[-1].generated_text == expected[0] and events[-1].details.finish_reason == "length"
    assert all(e.generated_text is None for e in events[:-1])


def test_async_client_generate_and_stream(server: str, dirs: tuple[Path, Path], expected) -> None:
    options = dict(adapter_id=str(dirs[1]), adapter_source="local", max_new_tokens=10, ignore_eos_token=True)

    async def run() -> tuple:
        client = AsyncClient(server)
        response = await client.generate(PROMPT, **options)
        streamed = [e async for e in client.generate_stream(PROMPT, **options)]
        return response, streamed

    response, streamed = asyncio.run(run())
    assert response.generated_text == expected[0]
    assert [e.token.id for e in streamed] == expected[1]
