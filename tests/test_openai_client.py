"""The unmodified PyPI `openai` SDK against a real server: completions and chat, streaming and not, adapters as model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_process import running_server
from tiny_models import save_random_adapter, save_tiny_chat_model

from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.engine.request import AdapterRef
from loraserve.sampling.params import SamplingParams

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a capital."}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("openai")
    base_dir = save_tiny_chat_model(root / "base")
    save_random_adapter(base_dir, root / "adapter", seed=2, r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "gate_proj"])
    return base_dir, root / "adapter"


@pytest.fixture(scope="module")
def client(dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(["--model-id", str(dirs[0]), "--dtype", "float32", "--device", "cpu"], log) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(dirs: tuple[Path, Path]) -> LLM:
    return LLM(EngineConfig(model_id=str(dirs[0]), dtype="float32", device="cpu"))


def test_completions_base_and_adapter(client: openai.OpenAI, offline: LLM, dirs: tuple[Path, Path]) -> None:
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    base, tuned = offline.generate(["Paris is"] * 2, params, [None, AdapterRef(str(dirs[1]), "local")])
    reply = client.completions.create(model="", prompt="Paris is", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == base.text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.id.startswith("cmpl-")
    reply = client.completions.create(model=str(dirs[1]), prompt="Paris is", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True, "adapter_source": "local"})
    assert reply.choices[0].text == tuned.text and reply.model == str(dirs[1])
    assert tuned.text != base.text


def test_chat_plain_and_streamed_agree(client: openai.OpenAI, offline: LLM) -> None:
    tokenizer = offline.engine.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)
    expected = offline.generate([prompt], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    reply = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert len(choice.logprobs.content) == 10 and len(choice.logprobs.content[0].top_logprobs) == 2
    assert [c.logprob for c in choice.logprobs.content] == pytest.approx([t.logprob for t in expected.tokens],
                                                                         abs=1e-5)
    chunks = list(client.chat.completions.create(
        model="", messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == len(prompt)


def test_stop_sequences_n_and_errors(client: openai.OpenAI, offline: LLM) -> None:
    free = client.completions.create(model="", prompt="Once upon", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[3:6]
    cut = client.completions.create(model="", prompt="Once upon", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == free[: free.index(stop)]
    reply = client.completions.create(model="", prompt="Once upon", max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    again = client.completions.create(model="", prompt="Once upon", max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client.completions.create(model="", prompt="x", max_tokens=4, temperature=-1)
    assert "temperature" in error.value.body["message"]
    with pytest.raises(openai.NotFoundError):  # an unknown `model` is OpenAI's 404
        client.completions.create(model="org/no-such-adapter", prompt="x", max_tokens=4,
                                  extra_body={"adapter_source": "local"})
    models = [m.id for m in client.models.list().data]
    assert models[0] == offline.engine.model_name


def test_models_lists_the_base_and_resident_adapters(client: openai.OpenAI, dirs: tuple[Path, Path]) -> None:
    client.completions.create(model=str(dirs[1]), prompt="x", max_tokens=2, extra_body={"adapter_source": "local"})
    assert [m.id for m in client.models.list().data] == [str(dirs[0]), str(dirs[1])]


def test_chat_uses_the_template_an_adapter_ships(client: openai.OpenAI, offline: LLM, dirs: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    templated = tmp_path / "templated-adapter"
    shutil.copytree(dirs[1], templated)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    (templated / "chat_template.jinja").write_text(template)
    # rendered as transformers' apply_chat_template(tokenize=True) would: no special tokens beyond the template's
    ids = offline.engine.tokenizer.encode("[system] Be brief.\n[user] Name a capital.\n[assistant]",
                                          add_special_tokens=False)
    expected = offline.generate([ids], SamplingParams(max_new_tokens=6, ignore_eos=True),
                                [AdapterRef(str(dirs[1]), "local")])[0]
    reply = client.chat.completions.create(model=str(templated), messages=MESSAGES, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True, "adapter_source": "local"})
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(ids)
