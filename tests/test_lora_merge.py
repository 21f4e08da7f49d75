"""Per-request adapter merges against PEFT's `add_weighted_adapter`, and across ranks, which PEFT refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tiny_models import save_random_adapter, save_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from loraserve.adapters.merge import MergeSpec, merge_adapters
from loraserve.adapters.peft import LoRAAdapter, load_peft_adapter
from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.engine.request import AdapterRef
from loraserve.errors import InvalidRequest
from loraserve.sampling.params import SamplingParams

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["The quick brown fox", "Paris is the capital"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("merge")
    base = save_tiny_model(tiny_config("llama"), root / "base")
    adapters = {
        "a": save_random_adapter(base, root / "a", 1, r=8, lora_alpha=16, target_modules=ALL),
        "b": save_random_adapter(base, root / "b", 2, r=8, lora_alpha=4, target_modules=["q_proj", "v_proj",
                                                                                          "down_proj", "lm_head"]),
        "c": save_random_adapter(base, root / "c", 3, r=8, lora_alpha=8, target_modules=ALL, use_rslora=True),
        "r4": save_random_adapter(base, root / "r4", 4, r=4, lora_alpha=12, target_modules=["q_proj", "up_proj"]),
    }
    return base, adapters


def _projections(base: Path) -> dict[str, tuple[int, int]]:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _ours(base: Path, adapters: dict[str, Path], spec: MergeSpec) -> LoRAAdapter:
    projections = _projections(base)
    parts = [load_peft_adapter(adapters[name], name, projections, torch.float32) for name in spec.adapter_ids]
    return merge_adapters(parts, spec)


def _peft_merged(base: Path, adapters: dict[str, Path], spec: MergeSpec) -> PeftModel:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    first, *rest = spec.adapter_ids
    model = PeftModel.from_pretrained(model, adapters[first], adapter_name=first)
    for name in rest:
        model.load_adapter(adapters[name], adapter_name=name)
    model.add_weighted_adapter(list(spec.adapter_ids), list(spec.weights), "merged",
                               combination_type=spec.strategy, density=spec.density,
                               majority_sign_method=spec.majority_sign_method)
    model.set_adapter("merged")
    return model


@pytest.mark.parametrize("spec", [
    MergeSpec(("a", "b"), (0.7, 0.4), "linear"),
    MergeSpec(("a", "b", "c"), (1.0, -0.5, 0.8), "linear"),  # a negative weight: its sign goes to A
    MergeSpec(("a", "c"), (0.6, 0.9), "ties", density=0.5, majority_sign_method="total"),
    MergeSpec(("a", "b", "c"), (0.5, 1.0, 0.3), "ties", density=0.3, majority_sign_method="frequency"),
], ids=lambda spec: f"{spec.strategy}-{len(spec.adapter_ids)}")
def test_merged_weights_equal_peft_add_weighted_adapter(fleet: tuple[Path, dict[str, Path]], spec: MergeSpec) -> None:
    base, adapters = fleet
    ours = _ours(base, adapters, spec)
    peft_model = _peft_merged(base, adapters, spec)
    expected = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            short = name.removeprefix("base_model.model.")
            expected[short] = (module.lora_A["merged"].weight, module.lora_B["merged"].weight * module.scaling["merged"])
    assert set(ours.modules) == set(expected)
    for name, (a, b) in expected.items():
        torch.testing.assert_close(ours.modules[name].a, a, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(ours.modules[name].b, b, rtol=1e-5, atol=1e-6, msg=name)


def test_generation_with_a_merge_equals_peft(fleet: tuple[Path, dict[str, Path]]) -> None:
    """Through the engine, in one batch with a plain adapter and a base row: the merged rows equal PEFT's."""
    base, adapters = fleet
    spec = MergeSpec((str(adapters["a"]), str(adapters["c"])), (0.6, 0.9), "ties", density=0.5)
    llm = LLM(EngineConfig(model_id=str(base), dtype="float32", device="cpu", max_active_adapters=4))
    refs = [AdapterRef.merged(spec, "local"), AdapterRef(str(adapters["b"]), "local"), None,
            AdapterRef.merged(spec, "local")]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[1]]
    results = llm.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True), refs)
    named = {str(path): name for name, path in adapters.items()}
    peft_model = _peft_merged(base, adapters, MergeSpec(tuple(named[i] for i in spec.adapter_ids), spec.weights,
                                                        spec.strategy, spec.density))
    for index in (0, 3):
        ids = torch.tensor([llm.engine.tokenizer.encode(prompts[index])])
        with torch.inference_mode():
            out = peft_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert results[index].token_ids == out[0, ids.shape[1]:].tolist()
    assert results[3].token_ids != results[2].token_ids  # the merge really changes the base model's output
    assert len(llm.engine.adapters.host.entries()) == 4  # a, b, c and one merge, shared by both merged requests


def _pad_adapter(source: Path, target: Path, rank: int) -> Path:
    """The same adapter written at a higher rank: zero rows of A, zero columns of B, alpha raised to keep alpha/r."""
    config = json.loads((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    padded = {}
    for key, tensor in tensors.items():
        extra = rank - config["r"]
        padded[key] = torch.nn.functional.pad(tensor, (0, 0, 0, extra) if "lora_A" in key else (0, extra))
    config["lora_alpha"] = config["lora_alpha"] * rank / config["r"]
    config["r"] = rank
    target.mkdir()
    save_file(padded, target / "adapter_model.safetensors")
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def test_linear_merging_across_ranks_equals_peft_on_zero_padded_adapters(
    fleet: tuple[Path, dict[str, Path]], tmp_path: Path
) -> None:
    """(TIES and DARE prune each adapter at its own size, so padding first would change what they keep.)"""
    base, adapters = fleet
    spec = MergeSpec(("a", "r4"), (0.8, 0.5), "linear")
    ours = _ours(base, adapters, spec)
    padded = {**adapters, "r4": _pad_adapter(adapters["r4"], tmp_path / "r4-as-r8", 8)}
    peft_model = _peft_merged(base, padded, spec)  # PEFT itself refuses unequal ranks
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(ours.modules["model.layers.0.self_attn.q_proj"].a, q.lora_A["merged"].weight)
    torch.testing.assert_close(ours.modules["model.layers.0.self_attn.q_proj"].b,
                               q.lora_B["merged"].weight * q.scaling["merged"])


def test_dare_keeps_the_density_share_and_is_linear_at_density_one(fleet: tuple[Path, dict[str, Path]]) -> None:
    base, adapters = fleet
    linear = _ours(base, adapters, MergeSpec(("a", "c"), (0.6, 0.9), "linear"))
    full = _ours(base, adapters, MergeSpec(("a", "c"), (0.6, 0.9), "dare_linear", density=1.0))
    for name, module in linear.modules.items():
        torch.testing.assert_close(full.modules[name].a, module.a)
    single = load_peft_adapter(adapters["a"], "a", _projections(base), torch.float32)
    generator = torch.Generator().manual_seed(0)
    sparse = merge_adapters([single, single], MergeSpec(("a", "a"), (1.0, 0.0), "dare_linear", density=0.25),
                            generator)
    kept = torch.cat([(m.a != 0).flatten().float() for m in sparse.modules.values()]).mean().item()
    assert 0.2 < kept < 0.3


@pytest.mark.parametrize("spec, message", [
    (MergeSpec(("a", "b"), (1.0,)), "2 ids but 1 weights"),
    (MergeSpec(("a",), (1.0,), "svd"), "merge_strategy must be one of"),
    (MergeSpec(("a",), (1.0,), "ties", density=0.0), "density"),
    (MergeSpec((), ()), "at least one"),
])
def test_bad_merge_specs_are_refused(spec: MergeSpec, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        spec.validate()
