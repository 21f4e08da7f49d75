"""Schemathesis against the server's own OpenAPI document, over real HTTP on a tiny model: every route, with bodies
that fit its schema and bodies that break it, must answer a status the document lists, in the media type and body
shape it gives, and never a 5xx. A hypothesis test of the sampling fields checks that the request models turn any
value into a request or into a clean validation error, and nothing else."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_process import running_server
from tiny_models import save_tiny_chat_model

from loraserve.config import EngineConfig, ServerConfig
from loraserve.engine.llm import LLM
from loraserve.errors import InvalidRequest
from loraserve.sampling.params import SamplingParams
from loraserve.server.convert import sampling_params_from_lorax
from loraserve.server.lorax.schemas import GenerateRequest
from loraserve.server.openai.routes import _params as openai_params
from loraserve.server.openai.schemas import ChatCompletionRequest

EXAMPLES_PER_MODE = 50  # per operation with inputs, valid and invalid ones each: >= 1000 cases over ten such routes


def _own_deadline(body: object) -> bool:
    """Whether the request set its own deadline (`request_timeout`, LoRAX's under `parameters`)."""
    if not isinstance(body, dict):
        return False
    parameters = body.get("parameters")
    return "request_timeout" in body or (isinstance(parameters, dict) and "request_timeout" in parameters)


def no_server_error(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                    case: schemathesis.Case) -> bool | None:
    """Schemathesis' `not_a_server_error`, but for the 504 of a request that ran out of the time it gave itself."""
    if response.status_code == 504 and _own_deadline(case.body):
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Small token limits keep each generation short; adapters can come from nowhere real (an empty adapter root,
    the Hub offline, one S3 bucket at a closed port), so a fuzzed adapter id fails fast instead of downloading."""
    model = save_tiny_chat_model(tmp_path_factory.mktemp("model"))
    root = tmp_path_factory.mktemp("adapters")
    log = tmp_path_factory.mktemp("logs") / "server.log"
    args = ["--model-id", str(model), "--dtype", "float32", "--device", "cpu", "--max-input-length", "8",
            "--max-total-tokens", "16", "--adapter-root", str(root), "--allowed-s3-buckets", "fuzz-bucket"]
    env = {"HF_HUB_OFFLINE": "1", "S3_ENDPOINT_URL": "http://127.0.0.1:9"}
    with running_server(args, log, env=env) as url:
        yield url, log


def test_every_route_answers_as_its_openapi_document_says(server: tuple[str, Path]) -> None:
    url, log = server
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    cases: Counter[str] = Counter()
    started = time.monotonic()
    for operation in operations:
        takes_input = bool(operation.body) or any(True for _ in operation.iter_parameters())
        # a route without inputs has exactly one valid request and no invalid one
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (GenerationMode.POSITIVE,)
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            def call(case: schemathesis.Case) -> None:
                response = case.call(base_url=url, timeout=60)
                case.validate_response(response, checks=CHECKS)
                cases[operation.label] += 1

            call()
    elapsed = time.monotonic() - started
    print(f"{sum(cases.values())} cases over {len(cases)} operations in {elapsed:.0f} s")
    assert set(cases) == {operation.label for operation in operations}
    assert sum(cases.values()) >= 1000
    text = log.read_text()
    assert "Traceback" not in text and "engine step failed" not in text, text[-3000:]


_NUMBERS = st.one_of(st.none(), st.integers(min_value=-2**70, max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=4))
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "typical_p", "repetition_penalty", "frequency_penalty",
                    "presence_penalty", "seed", "max_new_tokens", "return_k_alternatives", "best_of", "truncate")
_OPENAI_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                  "presence_penalty", "seed", "max_tokens", "n", "top_logprobs")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    model = save_tiny_chat_model(tmp_path_factory.mktemp("model"))
    return LLM(EngineConfig(model_id=str(model), dtype="float32", device="cpu", max_input_length=24,
                            max_total_tokens=32))


def _runs_or_refuses(engine: LLM, params: SamplingParams) -> None:
    """Accepted parameters must also decode: a value the checks let through must not fail the engine's step (which
    would fail every request in the batch)."""
    short = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens or 2, 2))
    try:
        engine.generate(["x"], short)
    except InvalidRequest:
        pass


@given(fields=st.fixed_dictionaries({}, optional={name: _NUMBERS for name in _SAMPLING_FIELDS}),
       do_sample=st.sampled_from([None, True, False]))
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_lorax_sampling_fields_validate_cleanly(engine: LLM, fields: dict, do_sample: bool | None) -> None:
    try:
        body = GenerateRequest.model_validate({"inputs": "x", "parameters": {**fields, "do_sample": do_sample}})
        params = sampling_params_from_lorax(body.parameters, reports_tokens=True, config=ServerConfig())
        params.validate()
    except (ValidationError, InvalidRequest):
        return
    _runs_or_refuses(engine, params)


@given(fields=st.fixed_dictionaries({}, optional={name: _NUMBERS for name in _OPENAI_FIELDS}),
       logprobs=st.booleans())
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_openai_sampling_fields_validate_cleanly(engine: LLM, fields: dict, logprobs: bool) -> None:
    try:
        body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                     "logprobs": logprobs, **fields})
        params = openai_params(body, body.max_tokens, body.top_logprobs if logprobs else None, ServerConfig())
        params.validate()
    except (ValidationError, InvalidRequest):
        return
    _runs_or_refuses(engine, params)
