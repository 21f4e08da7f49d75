"""The serving section of benchmarks/RESULTS.md and the plots, from the record run.py builds (a --quick record goes to
benchmarks/out/serving/ instead, so a smoke run never overwrites real results)."""

from __future__ import annotations

import datetime
import math
import os
from pathlib import Path

from benchmarks.serving.assets import machine, replace_section
from benchmarks.serving.peers.base import LOGS_DIR, SLOTS
from benchmarks.serving.plots import PLOTS, plot_all

BENCH = Path(__file__).resolve().parents[1]
OURS = "loraserve"
HEADING = "## Serving benchmark: the multi-adapter workload against peers"


def number(value: float, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _table(record: dict) -> list[str]:
    lines = ["| workload | peer | ok | req/s | out tok/s | TTFT p50 / p90 / p99 s | TPOT p50 / p99 ms | "
             "E2E p50 / p90 / p99 s | SLO TTFT<6s | SLO TTFT<1s & TPOT<100ms |", "|---" * 10 + "|"]
    labels = list(dict.fromkeys(run["label"] for peer in record["peers"].values() for run in peer["runs"]))
    for label in labels:
        for name, peer in record["peers"].items():
            for run in (r for r in peer["runs"] if r["label"] == label):
                s = run["summary"]
                slo = list(s["slo"].values())
                lines.append(
                    f"| {label} | {name} | {s['completed']}/{s['requests']} | {number(s['req_per_s'])} | "
                    f"{number(s['out_tok_per_s'], 1)} | {' / '.join(number(s['ttft'][q]) for q in ('p50', 'p90', 'p99'))} | "
                    f"{number(s['tpot']['p50'] * 1e3, 0)} / {number(s['tpot']['p99'] * 1e3, 0)} | "
                    f"{' / '.join(number(s['e2e'][q]) for q in ('p50', 'p90', 'p99'))} | {slo[0]:.0%} | {slo[1]:.0%} |")
    return lines


def _ratios(record: dict) -> list[str]:
    """Ours divided by theirs: above 1 is better for throughput, below 1 is better for latency."""
    ours = {run["label"]: run["summary"] for run in record["peers"].get(OURS, {}).get("runs", [])}
    others = [name for name, peer in record["peers"].items() if name != OURS and peer["runs"]]
    if not ours or not others:
        return ["No peer ran beside ours: no ratios."]
    lines = ["| workload | " + " | ".join(f"out tok/s vs {n} | TTFT p50 vs {n} | E2E p99 vs {n}" for n in others)
             + " |", "|---" * (1 + 3 * len(others)) + "|"]
    for label, mine in ours.items():
        cells = []
        for name in others:
            theirs = next((r["summary"] for r in record["peers"][name]["runs"] if r["label"] == label), None)
            if theirs is None:
                cells += ["-"] * 3
                continue
            cells += [number(ratio(mine["out_tok_per_s"], theirs["out_tok_per_s"])),
                      number(ratio(mine["ttft"]["p50"], theirs["ttft"]["p50"])),
                      number(ratio(mine["e2e"]["p99"], theirs["e2e"]["p99"]))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def peer_lines(record: dict) -> list[str]:
    """Each peer's version, start-up time, command and error (if any), as the results file lists them."""
    lines = []
    for name, peer in record["peers"].items():
        lines.append(f"- **{name}**: {peer['version']}" + (f"; started in {peer['startup_s']:.0f} s"
                                                           if "startup_s" in peer else ""))
        if peer["command"]:
            lines.append(f"  - `{peer['command']}`")
        if peer["error"]:
            lines += ["  - error, no numbers past this point:", "", "```", peer["error"][-3000:], "```"]
    return lines


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def write(record: dict) -> None:
    quick = record["args"]["quick"]
    results = LOGS_DIR / "serving-quick.md" if quick else BENCH / "RESULTS.md"
    plots = LOGS_DIR / "plots" if quick else BENCH / "plots"
    args = record["args"]
    lines = [
        f"{HEADING} ({datetime.date.today().isoformat()}{', quick smoke run' if quick else ''})", "",
        f"- Machine: {machine()}; every peer alone on it in turn, the load client on the same cores.",
        f"- Command: `.venv/bin/python -m benchmarks.serving.run {' '.join(record['argv'])}`".rstrip() + " "
        "(after `bash benchmarks/serving/install_peers.sh`).",
        f"- Model: Gemma 3 270M (the bundled Q4_K_M GGUF; dequantized to an HF folder in bf16 for vLLM and "
        f"transformers; llama.cpp runs the Q4_K_M weights). Adapters: random rank-16 PEFT adapters on q/k/v/o/gate/"
        f"up/down of all layers; beyond 32, adapter folders alias the weight files of the first 32. {SLOTS} adapters "
        f"batched at once (LoRA slots) for every multi-LoRA peer.",
        f"- Workload (S-LoRA style, seed {args['seed']}): Gamma arrivals with cv {args['cv']:g} (Poisson), "
        f"{args['duration']:g} s of arrivals per run (at least {args['min_requests']} requests), prompts of "
        f"{args['prompt_tokens'][0]}-{args['prompt_tokens'][1]} tokens and outputs of {args['output_tokens'][0]}-"
        f"{args['output_tokens'][1]} tokens (uniform, EOS ignored, greedy), popularity Zipf (P(rank k) ~ k^-1.5) "
        f"or uniform over n adapters; streamed `/v1/completions` with `model` = adapter, open loop. A request not "
        f"answered within {args['drain']:g} s after the last arrival counts as failed and misses every SLO.",
        "- Metrics: throughput over the wall time from the first arrival to the last answer; TTFT from sending to "
        "the first streamed token; TPOT = (E2E - TTFT) / (tokens - 1).", "",
        "### Peers", "",
    ]
    lines += peer_lines(record)
    lines += ["", "### Results", "", *_table(record), "",
              f"### Ratios, {OURS} / peer", "", "Throughput above 1 and latency below 1 are in our favour.", "",
              *_ratios(record), "",
              *(f"![{title}]({os.path.relpath(plots / file, results.parent)})" for file, title in PLOTS.items()), ""]
    if quick:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text("\n".join(lines))
    else:
        replace_section(HEADING, lines)
    plot_all(record, plots)
    print(f"wrote {results} and plots in {plots}")
