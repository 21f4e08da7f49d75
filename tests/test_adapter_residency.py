"""The adapter residency on its own: pins released on every exit, a byte budget, versions, loads that cannot hang,
and the disk scan kept off the step loop."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest
from tiny_models import save_random_adapter, save_tiny_model, tiny_config

import loraserve.adapters.cache as cache_module
import loraserve.engine.residency as residency_module
from loraserve.adapters.registry import AdapterKey
from loraserve.config import EngineConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.engine import Engine
from loraserve.engine.llm import LLM
from loraserve.engine.request import AdapterRef
from loraserve.errors import AdapterLoadError, AdapterNotFound
from loraserve.sampling.params import SamplingParams

PARAMS = SamplingParams(max_new_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("residency")
    base_dir = save_tiny_model(tiny_config("llama"), root / "base")
    adapters = [save_random_adapter(base_dir, root / f"a{i}", seed=10 + i, r=4 * (i + 1), lora_alpha=16,
                                    target_modules=["q_proj", "v_proj", "down_proj"]) for i in range(4)]
    return base_dir, adapters


def _alone(base_dir: Path, adapter: Path) -> list[int]:
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu"))
    return llm.generate(["Paris is"], PARAMS, [AdapterRef(str(adapter), "local")])[0].token_ids


def test_a_byte_budget_for_two_adapters_serves_four_and_leaves_nothing_pinned(fleet: tuple[Path, list[Path]],
                                                                             tmp_path: Path) -> None:
    base_dir, adapters = fleet
    probe = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu", cache_dir=tmp_path))
    sizes = [probe.engine.adapters.host.get(AdapterKey("local", str(a)), None).nbytes for a in adapters]
    budget = sizes[2] + sizes[3]  # room for the two largest at once, not for all four
    # a KV pool this small also preempts, which must release (and later re-acquire) the adapter
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu", adapter_device_memory=budget,
                           max_batch_total_tokens=128, max_total_tokens=128, max_input_length=64, cache_dir=tmp_path))
    refs = [AdapterRef(str(a), "local") for a in adapters] * 3
    results = llm.generate(["Paris is"] * len(refs), SamplingParams(max_new_tokens=20, ignore_eos=True), refs)
    expected = {str(a): _alone(base_dir, a) for a in adapters}
    for ref, result in zip(refs, results):
        assert result.token_ids[:5] == expected[ref.adapter_id]
    residency = llm.engine.adapters
    assert residency.device_bytes <= budget and residency.device_evictions > 0
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert all(info.requests == 0 for info in residency.resident())
    assert all(entry.pins == 0 for entry in residency.host.entries())


def test_an_adapter_above_the_device_budget_fails_alone(fleet: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, adapters = fleet
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu", adapter_device_memory=1024,
                           cache_dir=tmp_path))
    with pytest.raises(AdapterLoadError, match="--adapter-device-memory"):
        llm.generate(["Paris is"], PARAMS, [AdapterRef(str(adapters[0]), "local")])
    assert len(llm.generate(["Paris is"], PARAMS)[0].token_ids) == 5


def test_changed_files_are_a_new_version(fleet: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, adapters = fleet
    folder = tmp_path / "mutable"
    shutil.copytree(adapters[0], folder)
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu", cache_dir=tmp_path / "cache"))
    ref = AdapterRef(str(folder), "local")
    first = llm.generate(["Paris is"], PARAMS, [ref])[0].token_ids
    [old] = llm.engine.adapters.resident()
    shutil.rmtree(folder)
    shutil.copytree(adapters[1], folder)  # same id, other weights
    second = llm.generate(["Paris is"], PARAMS, [ref])[0].token_ids
    assert first == _alone(base_dir, adapters[0]) and second == _alone(base_dir, adapters[1]) and first != second
    versions = {info.version for info in llm.engine.adapters.resident() if info.tier == "device"}
    assert old.version in versions and len(versions) == 2  # the old copy is never read for the new files


def test_a_load_that_raises_anything_fails_every_waiter_and_hangs_nobody(fleet: tuple[Path, list[Path]],
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir, adapters = fleet
    engine = Engine.from_config(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu",
                                             cache_dir=tmp_path))
    released = threading.Event()

    def broken(*_: object, **__: object) -> None:
        released.wait(5)  # let every waiter pile up on the one load
        raise RuntimeError("boom")

    monkeypatch.setattr(cache_module, "load_peft_adapter", broken)
    ref = AdapterRef(str(adapters[0]), "local")
    errors: list[BaseException] = []

    def request() -> None:
        try:
            engine.adapters.prepare(ref)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    # daemon threads: a waiter left hanging fails the join below instead of blocking the test run's exit
    waiters = [threading.Thread(target=request, daemon=True) for _ in range(8)]
    for waiter in waiters:
        waiter.start()
    released.set()
    for waiter in waiters:
        waiter.join(timeout=10)
    assert not any(waiter.is_alive() for waiter in waiters), "a request for the broken adapter hangs"
    assert len(errors) == 8
    # the kind of the failure, not its text (which may name server folders): that goes to the log
    assert all(isinstance(e, AdapterLoadError) and "(RuntimeError)" in str(e) and "boom" not in str(e)
               for e in errors), errors
    monkeypatch.undo()
    engine.adapters.host.clock = lambda: 1e9  # past the failure's memory
    assert engine.adapters.prepare(ref).adapter.max_rank == 4


def test_the_disk_scan_of_the_inventory_runs_off_the_step_loop(fleet: tuple[Path, list[Path]], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir, _ = fleet
    engine = AsyncEngine(Engine.from_config(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu",
                                                         cache_dir=tmp_path)))
    scanned_on: list[threading.Thread] = []

    def scan(_: Path) -> list:
        scanned_on.append(threading.current_thread())
        return [("hub", "org/on-disk", 123)]

    monkeypatch.setattr(residency_module, "cached_on_disk", scan)
    engine.start()
    try:
        [info] = asyncio.run(engine.list_adapters())
    finally:
        engine.shutdown()
    assert (info.adapter_id, info.tier) == ("org/on-disk", "disk")
    assert scanned_on and scanned_on[0].name != "loraserve-step-loop"  # the thread `start` runs the loop on


def test_adapter_roots_confine_local_adapters(fleet: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """--adapter-root reaches the source policy: a folder inside a root serves, one outside is as missing."""
    base_dir, adapters = fleet
    root = tmp_path / "root"
    shutil.copytree(adapters[0], root / "inside")
    llm = LLM(EngineConfig(model_id=str(base_dir), dtype="float32", device="cpu", cache_dir=tmp_path / "cache",
                           adapter_root=(root,)))
    assert len(llm.generate(["Paris is"], PARAMS, [AdapterRef("inside", "local")])[0].token_ids) == 5
    with pytest.raises(AdapterNotFound):
        llm.generate(["Paris is"], PARAMS, [AdapterRef(str(adapters[1]), "local")])
