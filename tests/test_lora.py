"""Multi-LoRA: a mixed batch of adapters with different ranks and targets, plus base rows, against PEFT per adapter."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer
from peft import PeftModel
from safetensors.torch import load_file, save_file
from server_process import free_port
from tiny_models import save_random_adapter, save_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.engine import Engine
from loraserve.engine.llm import LLM, collect
from loraserve.engine.request import AdapterRef
from loraserve.errors import AdapterLoadError, AdapterNotFound
from loraserve.adapters.registry import AdapterKey
from loraserve.layers.lora import ProjectionLoRA
from loraserve.layers.lora_ops import LoRABatch, dense_add_, reference_delta, segmented_add_, uniform_delta
from loraserve.sampling.params import SamplingParams

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "r2-qv": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "r4-mlp": dict(r=4, lora_alpha=16, target_modules=MLP),
    "r8-all": dict(r=8, lora_alpha=8, target_modules=ATTENTION + MLP),
    "r16-rslora": dict(r=16, lora_alpha=8, target_modules=ATTENTION + MLP, use_rslora=True),
    "r6-patterns": dict(r=6, lora_alpha=12, target_modules=["o_proj", "down_proj", "k_proj"],
                        rank_pattern={"down_proj": 3}, alpha_pattern={"k_proj": 30}),
    "r12-attn": dict(r=12, lora_alpha=24, target_modules=ATTENTION),
    "r4-vocab": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"]),  # no projection
}
PROMPTS = ["The quick brown fox", "Paris is the capital", "def add(a, b):", "Once upon a time there",
           '{"name": "lora', "Straße, café"]


def build_adapters(architecture: str, root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny base model of `architecture` and one PEFT adapter per entry of ADAPTERS, saved under `root`."""
    base_dir = save_tiny_model(tiny_config(architecture), root / "base")
    adapters = {name: save_random_adapter(base_dir, root / name, seed, **options)
                for seed, (name, options) in enumerate(ADAPTERS.items())}
    return base_dir, adapters


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return build_adapters(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return build_adapters("llama", tmp_path_factory.mktemp("fleet-base"))


def peft_reference(base_dir: Path, adapter_dir: Path | None, prompt_ids: list[int], new_tokens: int):
    """Greedy tokens and their logprobs from PEFT (or the plain base model) for one prompt alone."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.generation_config.eos_token_id = None  # like ignore_eos: random tiny models may emit EOS early
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        logprobs = model(out).logits[0, len(prompt_ids) - 1 : -1].log_softmax(-1)
    tokens = out[0, len(prompt_ids):].tolist()
    return tokens, [logprobs[i, t].item() for i, t in enumerate(tokens)]


def test_mixed_batch_equals_peft_per_adapter(setup: tuple[Path, dict[str, Path]]) -> None:
    base_dir, adapters = setup
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu", max_batch_prefill_tokens=32))
    names = list(adapters) + [None, None, "r8-all", "r4-vocab"]  # 11 requests: 7 adapters, 2 repeated, 2 base rows
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    refs = [AdapterRef(str(adapters[n]), source="local") if n else None for n in names]
    results = llm.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True), refs)
    for name, prompt, result in zip(names, prompts, results):
        ids = llm.engine.tokenizer.encode(prompt)
        tokens, logprobs = peft_reference(base_dir, adapters[name] if name else None, ids, 8)
        assert result.token_ids == tokens, name
        assert [t.logprob for t in result.tokens] == pytest.approx(logprobs, abs=1e-4), name
    # not vacuous: the adapters really change the output of the base model
    base = llm.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    changed = [n for n, r, b in zip(names, results, base) if n and r.token_ids != b.token_ids]
    assert len(set(changed)) >= 6 and "r4-vocab" in changed, changed


ANY_RANK = {
    "r1-qv": dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]),  # PEFT's default targets
    "r8-mlp": dict(r=8, lora_alpha=16, target_modules=MLP),
    "r32-all": dict(r=32, lora_alpha=32, target_modules=ATTENTION + MLP),
    "r64-patterns": dict(r=64, lora_alpha=64, target_modules=ATTENTION + MLP, rank_pattern={"down_proj": 4},
                         alpha_pattern={"q_proj": 16}),
    "r128-qv": dict(r=128, lora_alpha=64, target_modules=["q_proj", "v_proj"], use_rslora=True),
}


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_any_rank_and_targets_in_one_batch_with_default_flags(architecture: str, tmp_path: Path) -> None:
    """Ranks 1 to 128 with different target sets, plus base rows, in one batch of an engine started with default
    LoRA flags; each row equals PEFT for its adapter alone, and each layer holds only the ranks targeting it."""
    base_dir = save_tiny_model(tiny_config(architecture), tmp_path / "base")
    adapters = {name: save_random_adapter(base_dir, tmp_path / name, seed, **options)
                for seed, (name, options) in enumerate(ANY_RANK.items())}
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu"))
    names = [*adapters, None, "r128-qv"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    refs = [AdapterRef(str(adapters[n]), "local") if n else None for n in names]
    results = llm.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), refs)
    for name, prompt, result in zip(names, prompts, results):
        tokens, logprobs = peft_reference(base_dir, adapters[name] if name else None,
                                          llm.engine.tokenizer.encode(prompt), 6)
        assert result.token_ids == tokens, name
        assert [t.logprob for t in result.tokens] == pytest.approx(logprobs, abs=1e-4), name
    model = llm.engine.core.runner.model
    layer = model.model.layers[0]
    # q holds r1 + r32 + r64 + r128 rows, gate r8 + r32 + r64, down r8 + r32 + the pattern's 4: nothing else
    assert layer.self_attn.q_proj.lora.used_rows == 1 + 32 + 64 + 128
    assert layer.mlp.gate_proj.lora.used_rows == 8 + 32 + 64
    assert layer.mlp.down_proj.lora.used_rows == 8 + 32 + 4


def test_fused_projections_take_lora_as_peft_applies_it(tmp_path: Path) -> None:
    """Phi-3 stores q/k/v and gate/up fused (`qkv_proj`, `gate_up_proj`); PEFT targets the fused modules as they are."""
    base_dir = save_tiny_model(tiny_config("phi3"), tmp_path / "base")
    targets = {"fused-attn": ["qkv_proj", "o_proj"], "fused-mlp": ["gate_up_proj", "down_proj"],
               "fused-all": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]}
    adapters = {name: save_random_adapter(base_dir, tmp_path / name, seed, r=4 + 2 * seed, lora_alpha=8,
                                          target_modules=modules)
                for seed, (name, modules) in enumerate(targets.items())}
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu"))
    names = [*adapters, None]
    prompts = PROMPTS[: len(names)]
    refs = [AdapterRef(str(adapters[n]), source="local") if n else None for n in names]
    results = llm.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True), refs)
    base = llm.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    for name, prompt, result, plain in zip(names, prompts, results, base):
        tokens, logprobs = peft_reference(base_dir, adapters[name] if name else None,
                                          llm.engine.tokenizer.encode(prompt), 6)
        assert result.token_ids == tokens, name
        assert [t.logprob for t in result.tokens] == pytest.approx(logprobs, abs=1e-4), name
        assert name is None or result.token_ids != plain.token_ids, name  # the adapter matters


def _arena(ranks: dict[int, int], d_in: int, d_out: int, dtype: torch.dtype = torch.float32) -> ProjectionLoRA:
    """A projection arena holding a random adapter of each `ranks[slot]` (rank 0: the adapter skips this layer)."""
    arena = ProjectionLoRA(d_in, d_out, dtype, torch.device("cpu"))
    for slot, rank in ranks.items():
        if rank:
            arena.place(slot, torch.randn(rank, d_in, dtype=dtype), torch.randn(d_out, rank, dtype=dtype))
    return arena


def test_lora_forms_agree_with_the_reference_loop() -> None:
    torch.manual_seed(0)
    d_in, d_out = 24, 40
    arena = _arena({0: 8, 1: 3, 2: 0, 3: 5, 4: 1, 5: 128}, d_in, d_out)  # slot 2: an adapter not targeting it
    x = torch.randn(30, d_in)
    token_slots = [(-1 if i % 7 == 0 else [0, 1, 2, 3, 4][i % 5]) for i in range(30)]
    batch = LoRABatch.build(token_slots, torch.device("cpu"))
    expected = reference_delta(x, arena.a, arena.b, batch, arena.placements)
    layer = arena.segments(batch)
    assert [rank for *_, rank in layer.placed] == [8, 3, 5, 1]  # slot 2 is skipped, slot 5 is not in the batch
    segmented = segmented_add_(torch.zeros(30, d_out), x, arena.a, arena.b, batch, layer)
    torch.testing.assert_close(segmented, expected, rtol=1e-5, atol=1e-5)
    dense = dense_add_(torch.zeros(30, d_out), x, arena.a, arena.b, batch, arena.column_slots())
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)
    assert dense[[i for i, s in enumerate(token_slots) if s in (-1, 2)]].abs().max() == 0
    assert sorted(batch.rows.tolist()) == [i for i, s in enumerate(token_slots) if s >= 0]
    assert batch.uniform_slot is None
    uniform = LoRABatch.build([3] * 30, torch.device("cpu"))
    assert uniform.uniform_slot == 3
    offset, rank = arena.placements[3]
    torch.testing.assert_close(uniform_delta(x, arena.a, arena.b, offset, rank),
                               reference_delta(x, arena.a, arena.b, uniform, arena.placements), rtol=1e-5, atol=1e-5)
    assert LoRABatch.build([-1, -1], torch.device("cpu")) is None


def test_an_inf_in_one_adapter_never_reaches_another_row() -> None:
    """Selection, not multiplication by a mask: the poisoned adapter's own rows go non-finite, no other row does."""
    torch.manual_seed(1)
    arena = _arena({0: 4, 1: 4, 2: 8}, 16, 12)
    offset, _ = arena.placements[1]
    arena.a[offset, 3] = float("inf")
    x = torch.randn(6, 16)
    batch = LoRABatch.build([0, 1, 2, -1, 0, 2], torch.device("cpu"))
    for out in (segmented_add_(torch.zeros(6, 12), x, arena.a, arena.b, batch, arena.segments(batch)),
                dense_add_(torch.zeros(6, 12), x, arena.a, arena.b, batch, arena.column_slots())):
        assert torch.isfinite(out[[0, 2, 3, 4, 5]]).all() and not torch.isfinite(out[1]).all()


def test_the_arena_grows_compacts_and_shrinks_without_moving_values() -> None:
    torch.manual_seed(2)
    arena = ProjectionLoRA(8, 6, torch.float32, torch.device("cpu"))
    weights = {}
    for slot, rank in enumerate([16, 3, 64, 1, 7, 128, 2]):
        weights[slot] = (torch.randn(rank, 8), torch.randn(6, rank))
        arena.place(slot, *weights[slot])
    for slot in (0, 2, 5):  # the large ones leave: the arena shrinks and compacts
        arena.remove(slot)
        del weights[slot]
    assert arena.a.shape[0] < 16 + 64 + 128
    weights[7] = (torch.randn(32, 8), torch.randn(6, 32))
    arena.place(7, *weights[7])
    for slot, (a, b) in weights.items():
        offset, rank = arena.placements[slot]
        assert torch.equal(arena.a[offset : offset + rank], a) and torch.equal(arena.b[offset : offset + rank], b.T)
    runs = sorted(arena.placements.values())
    assert all(first + rank <= after for (first, rank), (after, _) in zip(runs, runs[1:]))  # no two overlap
    assert arena.used_rows == 3 + 1 + 7 + 2 + 32


def test_bad_adapters_fail_only_their_own_requests(setup: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    base_dir, adapters = setup
    wrong_base = tmp_path / "wrong-base"
    wrong_base.mkdir()
    config = json.loads((adapters["r2-qv"] / "adapter_config.json").read_text())
    (wrong_base / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapters["r2-qv"] / "adapter_model.safetensors")
    save_file({k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in tensors.items()},
              wrong_base / "adapter_model.safetensors")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps(config))
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")

    engine = AsyncEngine(Engine.from_config(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu")))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    async def scenario() -> list:
        jobs = [
            collect(engine.generate("Paris is", params, adapter=AdapterRef(str(adapters["r4-mlp"]), "local"))),
            collect(engine.generate("Paris is", params, adapter=AdapterRef(str(wrong_base), "local"))),
            collect(engine.generate("Paris is", params, adapter=AdapterRef(str(tmp_path / "missing"), "local"))),
            collect(engine.generate("Paris is", params, adapter=AdapterRef(str(corrupt), "local"))),
            collect(engine.generate("Paris is", params)),
        ]
        return await asyncio.gather(*jobs, return_exceptions=True)

    engine.start()
    try:
        good, wrong, missing, broken, base = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert len(good.tokens) == 6 and len(base.tokens) == 6
    assert isinstance(wrong, AdapterLoadError) and "wrong base model" in str(wrong)
    assert isinstance(missing, AdapterNotFound)
    assert isinstance(broken, AdapterLoadError) and "cannot read" in str(broken)


def test_an_adapter_for_a_resized_vocabulary_names_the_mismatch(setup: tuple[Path, dict[str, Path]],
                                                                tmp_path: Path) -> None:
    """PEFT saves its frozen copy of a targeted embedding; a copy with more rows means another tokenizer."""
    base_dir, adapters = setup
    resized = tmp_path / "resized"
    resized.mkdir()
    (resized / "adapter_config.json").write_text((adapters["r4-vocab"] / "adapter_config.json").read_text())
    tensors = load_file(adapters["r4-vocab"] / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors  # the layout this test relies on
    tensors[key] = torch.cat([tensors[key], tensors[key][:8]])
    save_file(tensors, resized / "adapter_model.safetensors")
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu"))
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    with pytest.raises(AdapterLoadError, match="resized vocabulary"):
        llm.generate(["Paris is"], params, [AdapterRef(str(resized), "local")])
    original = llm.generate(["Paris is"], params, [AdapterRef(str(adapters["r4-vocab"]), "local")])
    assert len(original[0].token_ids) == 2


def test_adapter_from_s3_equals_the_local_copy(setup: tuple[Path, dict[str, Path]], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir, adapters = setup
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="adapters")
        for file in adapters["r8-all"].iterdir():
            s3.upload_file(str(file), "adapters", f"team/r8-all/{file.name}")
        llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu", s3_endpoint_url=endpoint,
                               cache_dir=tmp_path / "cache"))
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        from_s3, local = llm.generate(["Paris is"] * 2, params, [AdapterRef("s3://adapters/team/r8-all", "s3"),
                                                                 AdapterRef(str(adapters["r8-all"]), "local")])
        assert from_s3.token_ids == local.token_ids
        with pytest.raises(AdapterNotFound):
            llm.generate(["Paris is"], params, [AdapterRef("s3://adapters/team/missing", "s3")])
    finally:
        server.stop()


def test_failures_are_remembered_for_a_while(setup: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    import shutil

    base_dir, adapters = setup
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu"))
    now = [0.0]
    llm.engine.adapters.host.clock = lambda: now[0]
    late = tmp_path / "late-adapter"
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with pytest.raises(AdapterNotFound):
        llm.generate(["Paris is"], params, [AdapterRef(str(late), "local")])
    shutil.copytree(adapters["r4-mlp"], late)
    with pytest.raises(AdapterNotFound):  # remembered: not looked up again within the TTL
        llm.generate(["Paris is"], params, [AdapterRef(str(late), "local")])
    now[0] += 31.0  # past the failure TTL
    assert len(llm.generate(["Paris is"], params, [AdapterRef(str(late), "local")])[0].tokens) == 4
    assert llm.engine.adapters.host.loads == 1


def test_a_thousand_adapters_with_bounded_host_memory(llama_setup: tuple[Path, dict[str, Path]],
                                                      tmp_path: Path) -> None:
    """1000 adapter folders (ten distinct weight sets under 1000 ids, so PEFT needs running only ten times) served
    through 8 slots and a host cache bounded to about 50 adapters; every answer equals PEFT's for its weight set.
    Run on one family only: the path under test is the cache, not the model."""
    base_dir, adapters = llama_setup
    sets = list(adapters.values())[:5] * 2
    root = tmp_path / "fleet"
    for i in range(1000):
        folder = root / f"adapter-{i:04d}"
        folder.mkdir(parents=True)
        for file in sets[i % 10].iterdir():
            (folder / file.name).symlink_to(file)
    one = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu"))
    sizes = {}
    for k in range(10):
        sizes[k] = one.engine.adapters.host.get(AdapterKey("local", str(root / f"adapter-{k:04d}")), None).nbytes
    budget = int(sum(sizes.values()) / 10 * 50)
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu", max_active_adapters=8,
                           adapter_memory=budget, max_running_requests=32))
    prompt_ids = llm.engine.tokenizer.encode("Paris is")
    expected = {k: peft_reference(base_dir, sets[k], prompt_ids, 3)[0] for k in range(10)}
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, chosen_logprob=False)
    order = [(i * 7919) % 1000 for i in range(1000)]  # every adapter once, in a scattered order
    for start in range(0, 1000, 32):
        batch = order[start : start + 32]
        refs = [AdapterRef(str(root / f"adapter-{i:04d}"), "local") for i in batch]
        results = llm.generate(["Paris is"] * len(batch), params, refs)
        for i, result in zip(batch, results):
            assert result.token_ids == expected[i % 10], i
        assert llm.engine.adapters.host.nbytes <= budget
    host = llm.engine.adapters.host
    assert host.loads == 1000 and host.evictions >= 1000 - 50 - 1


def test_an_adapter_above_the_slot_rank_fails_only_itself(setup: tuple[Path, dict[str, Path]]) -> None:
    base_dir, adapters = setup
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu", max_lora_rank=8))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    with pytest.raises(AdapterLoadError, match="--max-lora-rank"):
        llm.generate(["Paris is", "Paris is"], params,
                     [AdapterRef(str(adapters["r4-mlp"]), "local"), AdapterRef(str(adapters["r16-rslora"]), "local")])
    assert not llm.engine.has_work()  # the request added before it was withdrawn, nothing is left half-queued
    assert len(llm.generate(["Paris is"], params, [AdapterRef(str(adapters["r4-mlp"]), "local")])[0].tokens) == 4
