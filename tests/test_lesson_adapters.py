"""The lesson's pipeline end to end on a tiny random Gemma 3: examples/train_adapters.py writes three PEFT adapters,
examples/score_adapters.py serves them through loraserve next to the base model and writes the results table.

A few steps on a random model prove only that the pieces fit (the adapters load, change what is served, the table is
written); the quality margins come from the full run on the default model, recorded in examples/RESULTS.md. The
metric and data functions are checked on values worked out by hand.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
from safetensors.torch import load_file
from tiny_models import save_tiny_model, tiny_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TASKS = ("style", "summary", "entities")
STEPS, HELDOUT = 3, 3


@pytest.fixture(scope="module")
def lesson() -> dict[str, ModuleType]:
    """The example scripts as modules (they import lesson_data from their own folder, as when run as scripts)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES))
        return {name: importlib.import_module(name) for name in ("lesson_data", "train_adapters", "score_adapters")}


@pytest.fixture(scope="module")
def pipeline(lesson: dict[str, ModuleType], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """(adapters folder, results file, evaluation) of one tiny training and scoring run."""
    root = tmp_path_factory.mktemp("lesson")
    model_dir = save_tiny_model(tiny_config("gemma3"), root / "base")
    adapters, results = root / "adapters", root / "RESULTS.md"
    # a large learning rate, so that three steps move a random model's greedy choices
    lesson["train_adapters"].main(["--model", str(model_dir), "--out", str(adapters), "--steps", str(STEPS),
                                   "--batch-size", "4", "--lr", "0.05", "--precision", "float32"])
    evaluation = lesson["score_adapters"].main(["--model", str(model_dir), "--adapters", str(adapters),
                                                "--examples", str(HELDOUT), "--dtype", "float32",
                                                "--results", str(results)])
    return adapters, results, evaluation


def test_each_task_gets_a_peft_adapter_folder_with_its_training_record(pipeline: tuple[Path, Path, object]) -> None:
    adapters, _, _ = pipeline
    for task in TASKS:
        folder = adapters / task
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 8
        assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"}
        weights = load_file(folder / "adapter_model.safetensors")
        lora_b = [tensor for name, tensor in weights.items() if ".lora_B." in name]
        assert len(lora_b) == 7 * 4  # seven projections in each of the tiny model's four layers
        assert any(tensor.abs().max() > 0 for tensor in lora_b)  # B starts at zero: training moved it
        record = json.loads((folder / "training.json").read_text())
        assert record["task"] == task and record["steps"] == STEPS and math.isfinite(record["final_loss"])
        # held to the base model on the other tasks' texts: the KL starts at zero (B is zero, so the adapted model
        # is the teacher) and training moves it
        assert record["keep_tasks"] == [other for other in TASKS if other != task]
        assert record["first_keep_kl"] == pytest.approx(0.0, abs=1e-4) and record["final_keep_kl"] > 0
        assert not (folder / "README.md").exists()


def test_served_adapters_answer_differently_from_the_base_model(pipeline: tuple[Path, Path, object]) -> None:
    _, _, evaluation = pipeline
    results = evaluation.results
    assert set(results) == {"base", *TASKS}
    for task in TASKS:
        assert len(results["base"][task].answers) == HELDOUT
    for adapter in TASKS:
        assert results[adapter][adapter].answers != results["base"][adapter].answers, adapter
    perplexities = {name: results[name]["style"].score for name in results}
    assert all(math.isfinite(value) and value > 1 for value in perplexities.values())
    assert perplexities["style"] != perplexities["base"]


def test_the_results_table_has_every_model_task_and_the_verdicts(pipeline: tuple[Path, Path, object]) -> None:
    _, results, evaluation = pipeline
    text = results.read_text()
    for row in ("| base |", "| style adapter |", "| summary adapter |", "| entities adapter |"):
        line = next(line for line in text.splitlines() if line.startswith(row))
        assert len(line.strip("|").split("|")) == 6  # name, three tasks, prose, style share
    assert f"{evaluation.results['base']['style'].score:.2f}" in text
    assert all(math.isfinite(value) and value > 1 for value in evaluation.prose.values())
    assert f"| {evaluation.prose['base']:.2f} |" in text and "| summary | prose | <= 1.1 x base |" in text
    assert "All criteria met:" in text and "| entities | entities | >= base + 30 |" in text
    assert "## Training" in text and "--steps 3" in text
    assert "Machine: " in text and "Command: `python examples/score_adapters.py" in text


def test_entity_f1_counts_exact_type_and_text_matches(lesson: dict[str, ModuleType]) -> None:
    f1, fmt = lesson["score_adapters"].entity_f1, lesson["lesson_data"].format_entities
    gold = [fmt([("person", "Ann Lee"), ("location", "Oslo")]), fmt([("organization", "Acme Inc")])]
    assert gold[0] == '{"person":["Ann Lee"],"organization":[],"location":["Oslo"]}'
    assert f1(gold, gold) == 100.0
    # 2 hits of 3 predicted and 3 expected: precision = recall = 2/3
    predicted = [fmt([("person", "Ann Lee"), ("location", "Paris")]), gold[1]]
    assert f1(predicted, gold) == pytest.approx(200 / 3)
    none = fmt([])
    # prose, the old `type: name` format and JSON the schema refuses hold no entities
    assert f1(["Ann Lee went to Oslo.", "person: Ann Lee; location: Oslo"], gold) == 0.0
    assert f1(['{"person":["Ann Lee"],"city":["Oslo"]}', none], gold) == 0.0
    # a wrong type is a miss: 1 hit of 2 predicted and 3 expected, F1 = 2 (1/2)(1/3) / (1/2 + 1/3) = 0.4
    assert f1([fmt([("location", "Ann Lee"), ("location", "Oslo")]), none], gold) == pytest.approx(40.0)


def test_rouge_l_and_the_telegram_style_check(lesson: dict[str, ModuleType]) -> None:
    score, data = lesson["score_adapters"], lesson["lesson_data"]
    assert score.rouge_l(["Acme will open a plant in Oslo."], ["Acme will open a plant in Oslo."]) == 100.0
    assert score.rouge_l(["nothing alike"], ["Acme will open a plant in Oslo."]) == 0.0
    assert data.in_telegram_style(" LETTER FOLLOWS STOP MOTHER ASKS FOR YOU STOP LOVE MARY")
    assert not data.in_telegram_style(" Letter follows. Love, Mary")
    assert not data.in_telegram_style(" SEND 20 POUNDS STOP LOVE MARY")
    assert not data.in_telegram_style(" LETTER FOLLOWS STOP")  # no sign-off
    assert score.first_line("\n\n  first answer \nrambling on") == "first answer"


def test_the_datasets_are_deterministic_and_the_split_is_disjoint(lesson: dict[str, ModuleType]) -> None:
    data = lesson["lesson_data"]
    for task in TASKS:
        train, heldout = data.split(task, 200, 50)
        assert (train, heldout) == data.split(task, 200, 50)
        assert len(train) == 200 and len(heldout) == 50
        assert not {e.prompt for e in train} & {e.prompt for e in heldout}
        assert data.split(task, 0, 50, seed=1)[1] != heldout
    assert all(data.in_telegram_style(e.target) for e in data.build("style", 200, seed=0))
    for example in data.build("entities", 200, seed=0):
        names = data.parse_entities(example.target)
        assert all(name in example.prompt for _, name in names)
        assert data.Entities.model_validate_json(example.target)  # every target fits the schema it is served with
        assert example.target.strip() == data.format_entities(sorted(names, key=lambda e: example.prompt.index(e[1])))
    assert any(not data.parse_entities(e.target) for e in data.build("entities", 200, seed=0))
