"""Score the base model and the lesson's three adapters on the three held-out tasks, through loraserve.

    python examples/score_adapters.py                      # default model, examples/adapters -> examples/RESULTS.md
    python examples/score_adapters.py --model DIR --adapters /tmp/adapters --examples 8 --results /tmp/RESULTS.md

Every figure comes from loraserve's offline API (`loraserve.engine.llm.LLM`) with the adapters loaded from their
folders (`adapter_source=local`), all four models batched together by the engine, greedy decoding: the table
measures what a user is served. Metrics, one per task:

- style: perplexity of the held-out telegrams' continuations given their first two clauses (the prompt logprobs
  loraserve reports), lower is better; beside it the share of greedy continuations that keep the telegram's
  conventions (`lesson_data.in_telegram_style`);
- summary: ROUGE-L F1 (Google's `rouge-score`, stemmed) of the greedy summary against the reference, mean x 100;
- entities: entity-level micro F1 x 100, an entity counting as found when its type and exact text match (CoNLL's rule),
  the answer read as the `Entities` JSON the adapter is trained to write (anything else holds no entity);
- prose: perplexity of benchmarks/data/perplexity.txt, a story no model here was trained on, in windows of
  `PROSE_WINDOW` tokens: what an adapter does to text that is none of the tasks.

A model's answer is the first non-empty line it writes, so the base model, which never learned to stop, is judged on
the line it starts with, not on what it rambles into next.

The verdict applies margins fixed before the first run (`OWN_TASK_MARGIN`, `OTHER_TASK_BOUND`): each adapter must
beat the base model on its own task by the margin, and be no worse than the base model on the other two, and on the
prose, by more than the bound.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rouge_score.rouge_scorer import RougeScorer

from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.engine.request import AdapterRef
from loraserve.sampling.params import SamplingParams

from lesson_data import HELDOUT_SIZE, TASKS, Example, in_telegram_style, parse_entities, split

HERE = Path(__file__).parent
PROSE_FILE = HERE.parent / "benchmarks" / "data" / "perplexity.txt"
PROSE_WINDOW = 256  # tokens per scored window of the prose (each window starts afresh after BOS)
BASE = "base"
PROSE = "prose"
METRIC_NAMES = {"style": "style: perplexity", "summary": "summary: ROUGE-L", "entities": "entities: F1",
                PROSE: "prose: perplexity"}
LOWER_IS_BETTER = {"style", PROSE}
# own task: perplexity at most this factor of the base model's; ROUGE-L and F1 at least this many points above it
OWN_TASK_MARGIN = {"style": 0.5, "summary": 20.0, "entities": 30.0}
# other tasks: perplexity at most this factor above the base model's; ROUGE-L and F1 at most this many points below
OTHER_TASK_BOUND = {"style": 1.10, "summary": 5.0, "entities": 5.0, PROSE: 1.10}
ANSWER_ROOM = 16  # new tokens allowed past the longest reference answer


@dataclass
class TaskResult:
    score: float  # the task's metric (see METRIC_NAMES)
    answers: list[str]  # greedy answers, in held-out order
    style_share: float | None = None  # style only: % of greedy continuations in telegram style


@dataclass
class Evaluation:
    results: dict[str, dict[str, TaskResult]] = field(default_factory=dict)  # model -> task -> result
    prose: dict[str, float] = field(default_factory=dict)  # model -> perplexity of the prose
    seconds: float = 0.0


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def rouge_l(answers: Sequence[str], references: Sequence[str]) -> float:
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, answer)["rougeL"].fmeasure for answer, ref in zip(answers, references)]
    return 100 * sum(scores) / len(scores)


def entity_f1(answers: Sequence[str], references: Sequence[str]) -> float:
    hits = predicted = expected = 0
    for answer, reference in zip(answers, references):
        found, gold = parse_entities(answer), parse_entities(reference)
        hits, predicted, expected = hits + len(found & gold), predicted + len(found), expected + len(gold)
    if not hits:
        return 0.0
    precision, recall = hits / predicted, hits / expected
    return 100 * 2 * precision * recall / (precision + recall)


def evaluate(llm: LLM, adapters: dict[str, Path], heldout: dict[str, list[Example]]) -> Evaluation:
    """Every model (the base, then each adapter) on every task's held-out examples: one batched greedy pass per task,
    plus one prompt-logprob pass for the style perplexity."""
    started = time.perf_counter()
    models: dict[str, AdapterRef | None] = {BASE: None}
    models.update({name: AdapterRef(str(folder.resolve()), "local") for name, folder in adapters.items()})
    evaluation = Evaluation({name: {} for name in models})
    for task, examples in heldout.items():
        references = [example.target.strip() for example in examples]
        answers = greedy_answers(llm, models, examples)
        perplexities = continuation_perplexity(llm, models, examples) if task == "style" else {}
        for name, given in answers.items():
            if task == "style":
                share = 100 * sum(in_telegram_style(answer) for answer in given) / len(given)
                evaluation.results[name][task] = TaskResult(perplexities[name], given, share)
            elif task == "summary":
                evaluation.results[name][task] = TaskResult(rouge_l(given, references), given)
            else:
                evaluation.results[name][task] = TaskResult(entity_f1(given, references), given)
        print(f"{task}: scored {len(models)} models at {time.perf_counter() - started:.0f} s", flush=True)
    evaluation.prose = prose_perplexity(llm, models, PROSE_FILE.read_text())
    evaluation.seconds = time.perf_counter() - started
    return evaluation


def greedy_answers(llm: LLM, models: dict[str, AdapterRef | None], examples: Sequence[Example]
                   ) -> dict[str, list[str]]:
    """Each model's first answer line per example, all models in one batch; room for the longest reference."""
    tokenizer = llm.engine.tokenizer
    longest = max(len(tokenizer.encode(example.target, add_special_tokens=False)) for example in examples)
    params = SamplingParams(max_new_tokens=longest + ANSWER_ROOM, temperature=0, chosen_logprob=False)
    prompts = [example.prompt for example in examples]
    completions = llm.generate(prompts * len(models), params, [ref for ref in models.values() for _ in examples])
    return {name: [first_line(c.text) for c in completions[index * len(examples) : (index + 1) * len(examples)]]
            for index, name in enumerate(models)}


def continuation_perplexity(llm: LLM, models: dict[str, AdapterRef | None], examples: Sequence[Example]
                            ) -> dict[str, float]:
    """exp(mean negative logprob) of the continuations' tokens given their prompts (EOS not counted), per model."""
    tokenizer = llm.engine.tokenizer
    pairs = [(tokenizer.encode(e.prompt), tokenizer.encode(e.target, add_special_tokens=False)) for e in examples]
    sequences = [prompt + target for prompt, target in pairs]
    params = SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=0, chosen_logprob=False)
    completions = llm.generate(sequences * len(models), params, [ref for ref in models.values() for _ in examples])
    perplexities = {}
    for index, name in enumerate(models):
        logprobs = []
        for completion, (_, target) in zip(completions[index * len(examples) : (index + 1) * len(examples)], pairs):
            logprobs += [entry[1] for entry in completion.prompt_logprobs[-len(target):]]
        perplexities[name] = math.exp(-sum(logprobs) / len(logprobs))
    return perplexities


def prose_perplexity(llm: LLM, models: dict[str, AdapterRef | None], text: str) -> dict[str, float]:
    """exp(mean negative logprob) of every token of `text` but each window's first, per model."""
    tokenizer = llm.engine.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    windows = [bos + ids[start : start + PROSE_WINDOW] for start in range(0, len(ids), PROSE_WINDOW)]
    params = SamplingParams(max_new_tokens=1, temperature=0, prompt_logprobs=0, chosen_logprob=False)
    completions = llm.generate(windows * len(models), params, [ref for ref in models.values() for _ in windows])
    perplexities = {}
    for index, name in enumerate(models):
        logprobs = [entry[1] for completion in completions[index * len(windows) : (index + 1) * len(windows)]
                    for entry in completion.prompt_logprobs[len(bos) + 1 :]]
        perplexities[name] = math.exp(-sum(logprobs) / len(logprobs))
    return perplexities


def verdicts(evaluation: Evaluation) -> list[tuple[str, str, bool, str]]:
    """(adapter, task, passed, the rule it was held to) for every adapter and task."""
    base = evaluation.results[BASE]
    checks = []
    for name, results in evaluation.results.items():
        if name == BASE:
            continue
        for task in TASKS:
            ours, theirs = results[task].score, base[task].score
            if task == name:
                if task in LOWER_IS_BETTER:
                    rule, passed = f"<= {OWN_TASK_MARGIN[task]} x base", ours <= OWN_TASK_MARGIN[task] * theirs
                else:
                    rule, passed = f">= base + {OWN_TASK_MARGIN[task]:g}", ours >= theirs + OWN_TASK_MARGIN[task]
            elif task in LOWER_IS_BETTER:
                rule, passed = f"<= {OTHER_TASK_BOUND[task]} x base", ours <= OTHER_TASK_BOUND[task] * theirs
            else:
                rule, passed = f">= base - {OTHER_TASK_BOUND[task]:g}", ours >= theirs - OTHER_TASK_BOUND[task]
            checks.append((name, task, passed, rule))
        bound = OTHER_TASK_BOUND[PROSE]
        checks.append((name, PROSE, evaluation.prose[name] <= bound * evaluation.prose[BASE], f"<= {bound} x base"))
    return checks


def cpu_model() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")


def results_markdown(evaluation: Evaluation, heldout: dict[str, list[Example]], adapters: dict[str, Path],
                     served: str, command: str) -> str:
    lines = [
        "# The lesson's adapters against the base model",
        "",
        f"Date: {datetime.date.today().isoformat()}. Machine: {cpu_model()}, {os.cpu_count()} cores. "
        f"Served: {served}.",
        f"Command: `{command}`",
        "",
        "Written by examples/score_adapters.py: held-out examples from examples/lesson_data.py (Faker, seeded, "
        "templated), scored through loraserve's `LLM` with greedy decoding, all four models batched together, "
        f"adapters from their folders. Scoring took {evaluation.seconds:.0f} s.",
        "",
        "| model | " + " | ".join(f"{METRIC_NAMES[task]} ({len(heldout[task])})" for task in heldout)
        + f" | {METRIC_NAMES[PROSE]} | style: greedy continuations in style |",
        "| --- | " + " | ".join("---:" for _ in heldout) + " | ---: | ---: |",
    ]
    for name, results in evaluation.results.items():
        cells = [f"{results[task].score:.2f}" if task in LOWER_IS_BETTER else f"{results[task].score:.1f}"
                 for task in heldout]
        share = f"{results['style'].style_share:.0f}%"
        lines.append(f"| {name if name == BASE else name + ' adapter'} | " + " | ".join(cells)
                     + f" | {evaluation.prose[name]:.2f} | {share} |")
    lines += [
        "", "Perplexity: lower is better; ROUGE-L and F1: higher is better, in points (x 100). Off-task perplexity "
        "measures how much probability an adapter still gives text it was not trained for: one that learned to "
        "answer in its own format (and to stop) gives a telegram's tokens less, even where its greedy continuation "
        "is no different from the base model's; the last column shows what greedy decoding serves. Prose: "
        f"{PROSE_FILE.relative_to(HERE.parent)} in windows of {PROSE_WINDOW} tokens, text none of the adapters was "
        "trained on or held to the base model on.", "",
    ]
    checks = verdicts(evaluation)
    lines += [
        "Criteria, fixed before the first run (the prose bound before the second, when the adapters were first "
        "held to the base model on other text): an adapter beats the base model on its own task by at least "
        f"{OWN_TASK_MARGIN['summary']:g} ROUGE-L points, {OWN_TASK_MARGIN['entities']:g} F1 points, or with at "
        f"most {OWN_TASK_MARGIN['style']:g}x its perplexity; on the other tasks it loses at most "
        f"{OTHER_TASK_BOUND['summary']:g} points or raises perplexity by at most "
        f"{(OTHER_TASK_BOUND['style'] - 1) * 100:.0f}%, and raises the prose's perplexity by at most "
        f"{(OTHER_TASK_BOUND[PROSE] - 1) * 100:.0f}%.",
        "",
        "| adapter | task | rule | passed |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {task} | {rule} | {'yes' if passed else '**no**'} |" for name, task, passed, rule in checks),
        "",
        f"All criteria met: {'yes' if all(passed for *_, passed, _ in checks) else '**no**'}.",
        "",
    ]
    lines += training_lines(adapters)
    lines += ["## One held-out example per task", ""]
    for task, examples in heldout.items():
        lines += [f"**{task}**, prompt: {_code(repr(examples[0].prompt), limit=1000)}", "",
                  f"- reference: {_code(examples[0].target.strip())}"]
        lines += [f"- {name}: {_code(results[task].answers[0])}" for name, results in evaluation.results.items()]
        lines.append("")
    return "\n".join(lines)


def _code(text: str, limit: int = 300) -> str:
    """`text` as a Markdown code span that a backtick or a rambling answer cannot break."""
    text = text.replace("`", "'")
    return f"`{text[:limit]}{'...' if len(text) > limit else ''}`" if text else "(empty)"


def training_lines(adapters: dict[str, Path]) -> list[str]:
    """The training runs recorded beside the adapters (training.json, written by train_adapters.py)."""
    records = [json.loads((folder / "training.json").read_text()) for folder in adapters.values()
               if (folder / "training.json").exists()]
    if not records:
        return []
    lines = ["## Training", "", f"Command: `{records[0]['command']}`. Time: wall-clock seconds of the training "
             "loop (loading the model not included), shared with whatever else ran on the machine.", "",
             "| adapter | steps x batch | examples | rank / alpha, modules | lr | loss first -> last 10 "
             "| held to the base model on | KL first -> last 10 | time | threads |",
             "| --- | ---: | ---: | --- | ---: | --- | --- | --- | ---: | ---: |"]
    for record in records:
        keep = (f"{', '.join(record['keep_tasks'])} ({record['keep_batch_size']} texts x "
                f"{record['keep_positions']} positions per step, weight {record['keep_weight']:g})"
                if record.get("keep_weight") else "nothing")
        kl = f"{record['first_keep_kl']:.3f} -> {record['final_keep_kl']:.3f}" if record.get("keep_weight") else "-"
        lines.append(
            f"| {record['task']} | {record['steps']} x {record['batch_size']} | {record['examples']} | "
            f"{record['rank']} / {record['alpha']}, {len(record['target_modules'])} projections | {record['lr']:g} | "
            f"{record['first_loss']:.2f} -> {record['final_loss']:.2f} | {keep} | {kl} | {record['seconds']:.0f} s | "
            f"{record['threads']} |")
    return lines + [""]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a .gguf file or an HF model folder (default: loraserve's default model)")
    parser.add_argument("--adapters", type=Path, default=HERE / "adapters", help="holds one folder per task")
    parser.add_argument("--examples", type=int, default=HELDOUT_SIZE, help="held-out examples per task")
    parser.add_argument("--dtype", default="auto", help="the engine's dtype (auto: what loraserve serves)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--seed", type=int, default=0, help="the data seed the adapters were trained with")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Evaluation:
    args = parse_args(argv)
    if not 1 <= args.examples <= HELDOUT_SIZE:
        raise SystemExit(f"--examples must be in 1..{HELDOUT_SIZE}")
    command = shlex.join(["python", "examples/score_adapters.py", *(sys.argv[1:] if argv is None else argv)])
    adapters = {task: args.adapters / task for task in TASKS}
    missing = [str(folder) for folder in adapters.values() if not (folder / "adapter_config.json").exists()]
    if missing:
        raise SystemExit(f"no adapter in {', '.join(missing)}: run examples/train_adapters.py first")
    heldout = {task: split(task, 0, HELDOUT_SIZE, seed=args.seed)[1][: args.examples] for task in TASKS}
    llm = LLM(EngineConfig(model_id=args.model, dtype=args.dtype, adapter_source="local"))
    evaluation = evaluate(llm, adapters, heldout)
    info = llm.engine.info()
    served = f"{info.model_name} ({info.dtype.removeprefix('torch.')}, {info.device_type})"
    args.results.write_text(results_markdown(evaluation, heldout, adapters, served, command))
    print(args.results.read_text())
    return evaluation


if __name__ == "__main__":
    main()
