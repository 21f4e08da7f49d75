"""`response_format` over HTTP on both APIs, with the real `openai` SDK: outputs validate, bad schemas answer 422."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from server_process import post_json, running_server
from tiny_models import save_tiny_chat_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
PATTERN = r"[A-Z]{2}-\d{3}"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("grammar")
    model = save_tiny_chat_model(root / "model")
    with running_server(["--model-id", str(model), "--dtype", "float32", "--device", "cpu"], root / "server.log") as base:
        yield base


def _generate(url: str, response_format: dict | None, seed: int, max_new_tokens: int = 200) -> tuple[int, dict]:
    parameters = {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": 1.0, "seed": seed,
                  "details": True}
    if response_format is not None:
        parameters["response_format"] = response_format
    return post_json(url + "/generate", {"inputs": "Describe a user:", "parameters": parameters})


def test_lorax_json_schema_outputs_validate(url: str) -> None:
    for form in ({"type": "json_schema", "schema": SCHEMA}, {"type": "json_object", "schema": SCHEMA}):
        for seed in range(4):
            status, reply = _generate(url, form, seed)
            assert status == 200, reply
            assert reply["details"]["finish_reason"] == "eos_token", reply
            jsonschema.validate(json.loads(reply["generated_text"]), SCHEMA)


def test_lorax_regex_streams_a_full_match(url: str) -> None:
    body = {"inputs": "Code:", "parameters": {"max_new_tokens": 50, "do_sample": True, "seed": 3,
                                              "response_format": {"type": "regex", "pattern": PATTERN}}}
    request = urllib.request.Request(url + "/generate_stream", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [json.loads(line[5:]) for line in response.read().decode().splitlines() if line.startswith("data:")]
    text = "".join(event["token"]["text"] for event in events)
    assert re.fullmatch(PATTERN, text) and events[-1]["generated_text"] == text


def test_text_format_is_no_constraint(url: str) -> None:
    assert _generate(url, {"type": "text"}, 7, 12)[1] == _generate(url, None, 7, 12)[1]


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ({"type": "json_schema"}, "needs a schema"),
    ({"type": "regex"}, "needs a non-empty"),
])
def test_unenforceable_formats_answer_422(url: str, response_format: dict, message: str) -> None:
    status, reply = _generate(url, response_format, 0)
    assert status == 422 and reply["error_type"] == "validation" and message in reply["error"], reply


def test_openai_sdk_response_formats(url: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(
        model="", prompt="A user:", max_tokens=200, temperature=1.0, seed=1,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMA)
    reply = client.completions.create(model="", prompt="An object:", max_tokens=200, temperature=1.0, seed=2,
                                      extra_body={"response_format": {"type": "json_object"}})
    if reply.choices[0].finish_reason == "stop":  # a free-form object may outgrow the budget
        assert isinstance(json.loads(reply.choices[0].text), dict)
    chat = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Describe a user."}], max_tokens=200, temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}})
    assert chat.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    with pytest.raises(openai.UnprocessableEntityError, match="uniqueItems"):
        client.completions.create(model="", prompt="x", max_tokens=5, extra_body={"response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}})
