"""The PEFT adapter_config.json parser under fuzzing: any JSON in any field ends in success or `AdapterLoadError`
(never a TypeError, AttributeError or re.error), pattern keys cannot stall the server, and valid random rank / alpha
patterns give exactly PEFT's per-module scales and weights."""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path

import pytest
import regex
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from loraserve.adapters.peft import (
    MAX_PATTERN_KEY_CHARS,
    MAX_PATTERN_KEYS,
    PATTERN_MATCH_BUDGET_S,
    load_peft_adapter,
    parse_adapter_config,
)
from loraserve.errors import AdapterLoadError

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
HIDDEN, INTERMEDIATE, LAYERS = 16, 24, 2
FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class _Block(torch.nn.Module):
    def __init__(self, names: list[str], shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        for name in names:
            setattr(self, name, torch.nn.Linear(*shapes[name], bias=False))


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, 8), "v_proj": (HIDDEN, 8), "o_proj": (HIDDEN, HIDDEN),
                  "gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE),
                  "down_proj": (INTERMEDIATE, HIDDEN)}
        self.self_attn = _Block(ATTENTION, shapes)
        self.mlp = _Block(MLP, shapes)


class TinyLlamaShape(torch.nn.Module):
    """Llama's module names (`model.layers.<i>.self_attn.q_proj`, ...) in a model PEFT wraps in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_Layer() for _ in range(LAYERS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never run
        return x


def _projections() -> dict[str, tuple[int, int]]:
    return {name: (m.in_features, m.out_features) for name, m in TinyLlamaShape().named_modules()
            if isinstance(m, torch.nn.Linear)}


PROJECTIONS = _projections()
MODULES = sorted(PROJECTIONS)
BASE_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"],
               "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
               "fan_in_fan_out": False, "lora_bias": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rank-2 weights for q_proj and down_proj of both layers; each example rewrites only adapter_config.json."""
    path = tmp_path_factory.mktemp("fuzz")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module in MODULES:
        if module.endswith(("q_proj", "down_proj")):
            d_in, d_out = PROJECTIONS[module]
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, d_in, generator=generator)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, 2, generator=generator)
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def _load(folder: Path, config_text: str | bytes):
    data = config_text.encode() if isinstance(config_text, str) else config_text
    (folder / "adapter_config.json").write_bytes(data)
    try:
        return load_peft_adapter(folder, "fuzz", PROJECTIONS, torch.float32)
    except AdapterLoadError:
        return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    | st.sampled_from(["q_proj", "(", "[", "*", "a{99999}", ".*", "(.|.)*\\d", "LORA", "LOHA"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.text(max_size=12) | st.sampled_from(["q_proj", "down_proj", "layers.0.self_attn.q_proj", "(", "*"]),
        children, max_size=4),
    max_leaves=12,
)
FIELDS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
          "fan_in_fan_out", "lora_bias", "peft_type"]


@FAST
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_any_json_in_any_field_loads_or_raises_adapter_load_error(folder: Path, field: str, value: object) -> None:
    """AdapterLoadError, or an adapter whose scales are finite; `_load` lets any other exception fail the test."""
    adapter = _load(folder, json.dumps({**BASE_CONFIG, field: value}))
    if adapter is not None:
        assert all(math.isfinite(m.scale) and m.b.isfinite().all() for m in adapter.modules.values())


@FAST
@given(config=json_values)
def test_any_json_document_loads_or_raises_adapter_load_error(folder: Path, config: object) -> None:
    _load(folder, json.dumps(config))


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=64) | st.sampled_from([b"[" * 100_000, b'{"r": 1' + b"0" * 5000 + b"}",
                                                      b'{"r": NaN}', b'{"lora_alpha": Infinity}', b"\xff\xfe{}",
                                                      b'{"lora_alpha": 1e999}']))
def test_any_bytes_load_or_raise_adapter_load_error(folder: Path, data: bytes) -> None:
    _load(folder, data)


@FAST
@given(patterns=st.dictionaries(st.text(alphabet="qkvdownup_.proj()|*+?[]^$\\{}0123456789,", max_size=10),
                                st.integers(min_value=1, max_value=4), max_size=4))
def test_pattern_lookup_equals_peft_get_pattern_key_for_any_key(patterns: dict[str, int]) -> None:
    """Random regex-ish keys: refused only where PEFT's own `re` refuses them or the bounded engine (`regex`) does
    not take them (`re`'s lenient literal braces, as in `{d`: never part of a module name), else the same
    module -> value map as PEFT's lookup."""
    try:
        parsed = parse_adapter_config({"rank_pattern": patterns}, "fuzz").rank_pattern
    except AdapterLoadError:
        with pytest.raises((re.error, regex.error, OverflowError, RecursionError, ValueError)):
            for key in patterns:
                re.compile(rf"(.*\.)?({key})$")
                if not re.fullmatch(r"[\w.\-]*", key):
                    regex.compile(rf"(.*\.)?({key})$", flags=regex.V0)
        return
    deadline = time.monotonic() + 5
    for module in MODULES:
        expected = patterns.get(get_pattern_key(patterns.keys(), module), -1)
        assert parsed.lookup("fuzz", module, "rank_pattern", -1, deadline) == expected, module


def test_catastrophic_and_oversized_pattern_keys_are_refused_quickly() -> None:
    # `re` would take about 2**31 steps on `model.layers.0.self_attn.q_proj` for this key
    config = {"r": 2, "alpha_pattern": {"(.|.)*\\d": 3}}
    settings_ = parse_adapter_config(config, "slow")
    start = time.monotonic()
    with pytest.raises(AdapterLoadError, match="takes too long"):
        settings_.alpha_for("slow", "model.layers.0.self_attn.q_proj", time.monotonic() + PATTERN_MATCH_BUDGET_S)
    assert time.monotonic() - start < PATTERN_MATCH_BUDGET_S + 1
    with pytest.raises(AdapterLoadError, match="longer than 256 characters"):
        parse_adapter_config({"rank_pattern": {"q" * (MAX_PATTERN_KEY_CHARS + 1): 2}}, "long")
    with pytest.raises(AdapterLoadError, match="keys"):
        parse_adapter_config({"alpha_pattern": {f"k{i}": 2 for i in range(MAX_PATTERN_KEYS + 1)}}, "many")
    for bad, message in [({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
                         ({"rank_pattern": {"q_proj": 0}}, "positive integer"),
                         ({"rank_pattern": {"q_proj": 2.0}}, "positive integer"),
                         ({"alpha_pattern": {"q_proj": "8"}}, "finite number"),
                         ({"alpha_pattern": ["q_proj"]}, "must be an object"),
                         ({"r": True}, "positive integer"), ({"r": -1}, "positive integer"),
                         ({"lora_alpha": float("inf")}, "finite number"), ({"target_modules": 3}, "target_modules"),
                         ({"target_modules": "(q"}, "target_modules"), ({"use_rslora": "yes"}, "true or false"),
                         ([], "JSON object"), ({"peft_type": "LOHA"}, "not LoRA"), ({"use_dora": True}, "DoRA")]:
        with pytest.raises(AdapterLoadError, match=message):
            parse_adapter_config(bad, "bad")


def test_a_rank_that_disagrees_with_the_config_is_refused(folder: Path) -> None:
    (folder / "adapter_config.json").write_text(json.dumps({**BASE_CONFIG, "rank_pattern": {"down_proj": 4}}))
    with pytest.raises(AdapterLoadError, match="has rank 2, but adapter_config.json gives it rank 4"):
        load_peft_adapter(folder, "fuzz", PROJECTIONS, torch.float32)


PATTERN_KEYS = ["q_proj", "k_proj", "down_proj", "up_proj", "self_attn.q_proj", "layers.0.self_attn.v_proj",
                "model.layers.1.mlp.down_proj", "mlp.gate_proj", r"layers\.[01]\.self_attn\.(q|v)_proj", r"(k|o)_proj",
                r".*\.1\.mlp\..*", "proj", r"layers.1.self_attn.k_proj", r"gate_proj|up_proj"]
lora_configs = st.fixed_dictionaries({
    "r": st.integers(min_value=1, max_value=6),
    "lora_alpha": st.integers(min_value=1, max_value=64) | st.floats(min_value=0.5, max_value=64.0),
    "use_rslora": st.booleans(),
    "target_modules": st.lists(st.sampled_from(ATTENTION + MLP), min_size=1, max_size=7, unique=True),
    "rank_pattern": st.lists(st.sampled_from(PATTERN_KEYS), max_size=4, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.integers(min_value=1, max_value=6) for k in keys})),
    "alpha_pattern": st.lists(st.sampled_from(PATTERN_KEYS), max_size=4, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: st.integers(min_value=1, max_value=64)
                                            | st.floats(min_value=0.5, max_value=64.0) for k in keys})),
})


@settings(max_examples=25, deadline=None, database=None)
@given(options=lora_configs, seed=st.integers(min_value=0, max_value=1000))
def test_valid_patterns_give_peft_scales_and_weights(options: dict, seed: int) -> None:
    """Against PEFT's reading of the saved folder (`PeftModel.from_pretrained`): PEFT writes the pattern keys
    sorted, so the first matching key can differ from the one the in-memory model used; PEFT then refuses its own
    checkpoint (a rank mismatch), and so must we."""
    torch.manual_seed(seed)
    trained = get_peft_model(TinyLlamaShape(), LoraConfig(init_lora_weights=False, **options))
    with tempfile.TemporaryDirectory() as directory:
        trained.save_pretrained(directory)
        try:
            model = PeftModel.from_pretrained(TinyLlamaShape(), directory)
        except RuntimeError as error:
            assert "size mismatch" in str(error)
            with pytest.raises(AdapterLoadError, match="but adapter_config.json gives it rank"):
                load_peft_adapter(Path(directory), "p", PROJECTIONS, torch.float32)
            return
        ours = load_peft_adapter(Path(directory), "p", PROJECTIONS, torch.float32)
    expected = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            expected[name.removeprefix("base_model.model.")] = (
                module.scaling["default"], module.lora_A["default"].weight, module.lora_B["default"].weight)
    assert set(ours.modules) == set(expected)
    for name, (scale, a, b) in expected.items():
        assert ours.modules[name].scale == scale, name  # exactly PEFT's float
        torch.testing.assert_close(ours.modules[name].a, a, rtol=0, atol=0)
        torch.testing.assert_close(ours.modules[name].b, b * scale, rtol=1e-6, atol=1e-7)
