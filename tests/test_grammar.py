"""Constrained decoding through the whole engine, on a tiny random model sampling at temperature 1.

A random model writes whatever the grammar lets it, so every output that finishes by the grammar must parse and
validate; outputs cut by `max_new_tokens` must say `length`. Unconstrained rows sharing the batch must not change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from tiny_models import EOS_ID, TOKENIZER_VOCAB, build_tokenizer, save_random_adapter, save_tiny_model, tiny_config

from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine, RequestOutput
from loraserve.engine.request import AdapterRef, FinishReason
from loraserve.errors import InvalidRequest
from loraserve.sampling.grammar import GrammarCompiler, GrammarSpec, apply_bitmask_, fill_bitmask
from loraserve.sampling.params import SamplingParams

MAX_NEW = 160
SEEDS = [11, 22, 33]
_short = {"type": "string", "maxLength": 6}

SCHEMAS: list[dict] = [
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "boolean"},
    {"type": "null"},
    {"enum": ["red", "green", "blue", 7, None]},
    {"type": "string", "maxLength": 5},
    {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]{2}$"},
    {"type": "string", "format": "date"},
    {"type": "string", "format": "email", "maxLength": 20},
    {"type": "string", "format": "uuid"},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    {"type": "object", "properties": {"name": _short, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": _short},
     "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
                                               "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "email": {"type": "string", "format": "email",
                                                                           "maxLength": 16}},
        "required": ["id", "email"], "additionalProperties": False},
        "active": {"type": "boolean"}}, "required": ["user", "active"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "null"}, _short]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 100},
                                      "currency": {"enum": ["EUR", "USD"]}},
     "required": ["price", "currency"], "additionalProperties": False},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}, "missing": {"type": "null"}},
     "required": ["when", "missing"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                                 "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                                "required": ["x", "y"], "additionalProperties": False},
     "minItems": 1, "maxItems": 2},
    {"$defs": {"leaf": {"type": "object", "properties": {"k": {"const": "v"}}, "required": ["k"],
                        "additionalProperties": False}},
     "type": "object", "properties": {"first": {"$ref": "#/$defs/leaf"}, "second": {"$ref": "#/$defs/leaf"}},
     "required": ["first"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                      "count": {"type": "integer", "minimum": 10, "maximum": 20},
                                      "ratio": {"type": "number", "minimum": -1, "maximum": 1}},
     "required": ["code", "count"], "additionalProperties": False},
]
REGEXES = [r"(yes|no|maybe)", r"[0-9]{3}-[0-9]{4}", r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)", r"#[0-9a-f]{6}"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    model_dir = save_tiny_model(tiny_config("llama"), tmp_path_factory.mktemp("llama"))
    return make_engine(model_dir)


def make_engine(model_dir: Path, **overrides: object) -> Engine:
    options = {"max_input_length": 64, "max_total_tokens": 256, "block_size": 4, **overrides}
    config = EngineConfig(model_id=str(model_dir), dtype="float32", device="cpu", **options)
    return Engine.from_config(config)


def sampled(spec: GrammarSpec | None, seed: int, max_new_tokens: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, seed=seed, grammar=spec)


def run(
    engine: Engine, params: list[SamplingParams], prompts: list[str] | None = None,
    adapters: list[AdapterRef | None] | None = None,
) -> list[RequestOutput]:
    """All requests in one batch; the final output of each, in order, with `tokens` holding every token."""
    prompts = prompts or ["Answer in JSON:"] * len(params)
    adapters = adapters or [None] * len(params)
    requests = [engine.make_request(prompt, p, adapter=a) for prompt, p, a in zip(prompts, params, adapters)]
    for request in requests:
        engine.add(request)
    tokens: dict[str, list] = {r.request_id: [] for r in requests}
    final: dict[str, RequestOutput] = {}
    while engine.has_work():
        for output in engine.step():
            tokens[output.request_id].extend(output.tokens)
            if output.finished:
                final[output.request_id] = output
    for request_id, output in final.items():
        output.tokens = tokens[request_id]
    return [final[r.request_id] for r in requests]


def check_finish(output: RequestOutput, max_new_tokens: int = MAX_NEW) -> bool:
    """True if the grammar ended the output; otherwise it must have been cut at `max_new_tokens`."""
    if output.finish_reason is FinishReason.LENGTH:
        assert output.generated_tokens == max_new_tokens
        return False
    assert output.finish_reason is FinishReason.EOS_TOKEN
    return True


def test_json_schemas_validate(engine: Engine) -> None:
    assert len(SCHEMAS) >= 20
    params = [sampled(GrammarSpec.json_schema(s), seed) for s in SCHEMAS for seed in SEEDS]
    outputs = run(engine, params)
    finished = 0
    for index, output in enumerate(outputs):
        schema = SCHEMAS[index // len(SEEDS)]
        if check_finish(output):
            finished += 1
            validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
            validator.validate(json.loads(output.generated_text))
    assert finished >= 0.9 * len(outputs), f"only {finished}/{len(outputs)} outputs completed their schema"
    assert len({o.generated_text for o in outputs}) > len(SCHEMAS), "seeded sampling should vary the outputs"


def test_outputs_cut_by_max_new_tokens_report_length(engine: Engine) -> None:
    spec = GrammarSpec.json_schema(SCHEMAS[15])  # a nested object: longer than 4 tokens
    outputs = run(engine, [sampled(spec, seed, max_new_tokens=4) for seed in SEEDS])
    assert all(o.finish_reason is FinishReason.LENGTH and o.generated_tokens == 4 for o in outputs)


def test_json_object(engine: Engine) -> None:
    outputs = run(engine, [sampled(GrammarSpec.json_object(), seed) for seed in range(6)])
    for output in outputs:
        if check_finish(output):
            assert isinstance(json.loads(output.generated_text), dict)
        else:
            assert output.generated_text.startswith("{")


def test_regex(engine: Engine) -> None:
    outputs = run(engine, [sampled(GrammarSpec.regex(r), seed) for r in REGEXES for seed in SEEDS])
    for index, output in enumerate(outputs):
        assert check_finish(output)
        assert re.fullmatch(REGEXES[index // len(SEEDS)], output.generated_text), output.generated_text


def test_unbounded_regex_ends_on_eos_even_with_ignore_eos(engine: Engine) -> None:
    """Once the grammar accepts, EOS is allowed; a constrained request that draws it finishes (the grammar ends)."""
    params = [SamplingParams(max_new_tokens=MAX_NEW, do_sample=True, seed=seed, ignore_eos=True,
                             grammar=GrammarSpec.regex(r"[a-z ]+")) for seed in range(8)]
    outputs = run(engine, params)
    for output in outputs:
        if check_finish(output):
            assert output.tokens[-1].id == EOS_ID
        assert re.fullmatch(r"[a-z ]+", output.generated_text)
    assert any(o.finish_reason is FinishReason.EOS_TOKEN for o in outputs)


def test_compact_json_by_default(engine: Engine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "b": {"type": "boolean"}},
              "required": ["a", "b"], "additionalProperties": False}
    for output in run(engine, [sampled(GrammarSpec.json_schema(schema), seed) for seed in SEEDS]):
        assert check_finish(output)
        assert re.fullmatch(r'\{"a":[0-9],"b":(true|false)\}', output.generated_text)


def test_unconstrained_rows_unchanged_in_a_mixed_batch(engine: Engine) -> None:
    prompts = ["The quick brown fox", "Paris is the capital of", "def add(a, b):"]
    greedy = [SamplingParams(max_new_tokens=12) for _ in prompts]
    alone = [[t.id for t in run(engine, [p], [prompt])[0].tokens] for p, prompt in zip(greedy, prompts)]
    constrained = [sampled(GrammarSpec.json_schema(s), 5) for s in SCHEMAS[10:16]]
    mixed = run(engine, greedy + constrained, prompts + ["JSON:"] * len(constrained))
    assert [[t.id for t in o.tokens] for o in mixed[: len(prompts)]] == alone
    assert all(check_finish(o) for o in mixed[len(prompts):])


def test_mixed_batch_with_lora_adapters(tmp_path: Path) -> None:
    """Greedy rows with and without adapters keep their tokens when constrained rows (with adapters too) join."""
    base_dir = save_tiny_model(tiny_config("llama"), tmp_path / "base")
    refs = [AdapterRef(str(save_random_adapter(base_dir, tmp_path / f"a{seed}", seed, r=4, lora_alpha=8,
                                               target_modules=["q_proj", "v_proj", "down_proj"])), "local")
            for seed in range(2)]
    engine = make_engine(base_dir, max_active_adapters=4)
    prompts = ["The quick brown fox", "Paris is the capital of", "def add(a, b):"]
    greedy, greedy_refs = [SamplingParams(max_new_tokens=10) for _ in prompts], [refs[0], None, refs[1]]
    alone = [[t.id for t in run(engine, [p], [prompt], [ref])[0].tokens]
             for p, prompt, ref in zip(greedy, prompts, greedy_refs)]
    constrained = [sampled(GrammarSpec.json_schema(s), 3) for s in SCHEMAS[12:16]]
    mixed = run(engine, greedy + constrained, prompts + ["JSON:"] * len(constrained),
                greedy_refs + [refs[0], refs[1], None, refs[0]])
    assert [[t.id for t in o.tokens] for o in mixed[: len(prompts)]] == alone
    assert alone[0] != [t.id for t in run(engine, [greedy[0]], prompts[:1])[0].tokens], "the adapter changes nothing"
    for output, schema in zip(mixed[len(prompts):], SCHEMAS[12:16]):
        if check_finish(output):
            jsonschema.validate(json.loads(output.generated_text), schema)


def test_preemption_keeps_the_grammar_state(tmp_path: Path) -> None:
    """Recompute after preemption keeps the output tokens, so the matcher must neither reset nor be fed twice."""
    model_dir = save_tiny_model(tiny_config("llama"), tmp_path / "model")
    params = [sampled(GrammarSpec.json_schema(s), 7, max_new_tokens=60) for s in SCHEMAS[12:22]]
    roomy = make_engine(model_dir, max_total_tokens=96)
    tight = make_engine(model_dir, max_total_tokens=96, max_batch_total_tokens=96)
    reference, outputs = run(roomy, params), run(tight, params)
    assert tight.core.scheduler.num_preemptions > 0, "the KV budget was meant to force preemption"
    assert [o.generated_text for o in outputs] == [o.generated_text for o in reference]
    for output, schema in zip(outputs, SCHEMAS[12:22]):
        if check_finish(output, 60):
            jsonschema.validate(json.loads(output.generated_text), schema)


def test_unsupported_keywords_are_refused_with_the_reason(engine: Engine) -> None:
    for schema, keyword in [({"type": "array", "uniqueItems": True}, "uniqueItems"),
                            ({"not": {"type": "string"}}, "not"),
                            ({"type": "integer", "if": {"minimum": 0}, "then": {"maximum": 5}}, "if")]:
        with pytest.raises(InvalidRequest, match=keyword):
            engine.make_request("x", sampled(GrammarSpec.json_schema(schema), 0))
    with pytest.raises(InvalidRequest, match="regex"):
        engine.make_request("x", sampled(GrammarSpec.regex("[a-z"), 0))
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        GrammarSpec.json_schema("{not json")


def test_each_schema_compiles_once(engine: Engine) -> None:
    spec = GrammarSpec.json_schema({"type": "object", "properties": {"z": {"type": "null"}}})
    first = engine.grammars._compiled(spec)
    assert GrammarSpec.json_schema(json.loads(spec.source)) == spec
    engine.make_request("x", sampled(spec, 0))
    assert engine.grammars._compiled(spec) is first


def test_padded_vocabulary_ids_are_never_allowed() -> None:
    """A model head wider than the tokenizer (Gemma pads its vocabulary): the extra ids stay masked."""
    compiler = GrammarCompiler(build_tokenizer(), TOKENIZER_VOCAB + 40, {EOS_ID})
    state = compiler.new_state(GrammarSpec.json_object())
    bitmask = fill_bitmask([None, state])
    assert bitmask.shape == (2, (TOKENIZER_VOCAB + 40 + 31) // 32)
    assert (bitmask[0] == -1).all()
    logits = torch.zeros(2, TOKENIZER_VOCAB + 40)
    apply_bitmask_(logits, bitmask, [1])
    assert (logits[0] == 0).all()
    assert torch.isinf(logits[1, TOKENIZER_VOCAB:]).all()
    assert 0 < int(torch.isfinite(logits[1]).sum()) < 10  # an object starts with `{` (or a token holding it)


def test_apply_bitmask_matches_a_bitwise_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = 1000
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, 32), dtype=torch.int32, generator=generator)
    bitmask[2, 1:] = 0  # few tokens allowed: the keep-and-fill path
    bitmask[3, 31] = -1  # bits past the vocabulary
    logits = torch.randn(4, vocab, generator=generator)
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    expected = logits.masked_fill(bits.flatten(1)[:, :vocab] == 0, float("-inf"))
    for rows, dtype in (([0, 1, 2, 3], torch.float32), ([1, 3], torch.float32), ([0, 2], torch.bfloat16)):
        masked = logits.to(dtype)
        apply_bitmask_(masked, bitmask, rows)
        others = [r for r in range(4) if r not in rows]
        assert torch.equal(masked[rows], expected[rows].to(dtype))
        assert torch.equal(masked[others], logits[others].to(dtype))
    assert np.array_equal(np.isfinite(expected.numpy()), bits.flatten(1)[:, :vocab].bool().numpy())


def test_rollback_returns_to_an_earlier_state() -> None:
    tokenizer = build_tokenizer()
    compiler = GrammarCompiler(tokenizer, TOKENIZER_VOCAB, {EOS_ID})
    state = compiler.new_state(GrammarSpec.regex(r"[0-9]{3}-[0-9]{4}"))
    ids = tokenizer.encode("123-4567", add_special_tokens=False)
    assert all(state.consume(t) for t in ids) and state.is_stopped
    state.rollback(len(ids) - 1)
    assert not state.is_stopped and not state.is_accepting
    assert all(state.consume(t) for t in ids[1:]) and state.is_accepting
    assert not compiler.new_state(GrammarSpec.regex(r"[0-9]{3}-[0-9]{4}")).consume(tokenizer.encode("x")[-1])


def test_default_model_outputs_validate_for_every_schema_and_regex() -> None:
    """The real Gemma 3 270M (bf16, its 262k vocabulary), one batch: each schema once, each regex once."""
    engine = Engine.from_config(EngineConfig(max_input_length=128, max_total_tokens=512))
    prompt = "Reply with a JSON object for a user record:"
    params = [sampled(GrammarSpec.json_schema(s), seed=5) for s in SCHEMAS]
    params += [sampled(GrammarSpec.regex(r), seed=5, max_new_tokens=40) for r in REGEXES]
    outputs = run(engine, params, [prompt] * len(params))
    finished = 0
    for schema, output in zip(SCHEMAS, outputs):
        if check_finish(output):
            finished += 1
            validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
            validator.validate(json.loads(output.generated_text))
    for pattern, output in zip(REGEXES, outputs[len(SCHEMAS):]):
        assert check_finish(output, 40) and re.fullmatch(pattern, output.generated_text), output.generated_text
    assert finished >= 0.9 * len(SCHEMAS), f"only {finished}/{len(SCHEMAS)} outputs completed their schema"
