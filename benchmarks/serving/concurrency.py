"""Concurrency against peers (issue 14): one stream, and 32 requests at once on the base model and over 32 adapters.

Single-stream speed and batched throughput are separate claims, so each peer is measured on both; the adapter rows
over the base row show what batching 32 distinct adapters together costs each peer.

Rows, on the default model (Gemma 3 270M), bf16, greedy, EOS ignored, short prompts, streamed `/v1/completions`:
one request alone (TPOT and tok/s; the only row for llama.cpp, which serializes requests and applies one LoRA to all),
32 requests at once on the base model, 32 at once over 32 distinct rank-16 adapters on all seven projections, and the
same over q/v-only adapters (PEFT's default targets). Every multi-LoRA peer gets 32 LoRA slots, so all 32 adapters
share each decode step. Each peer runs alone (started, its rows run, stopped); before each row a pass of its requests
cut to a few tokens warms the peer up and puts the row's adapters in their slots, then the row runs `--repeats` times
and the median is reported. A peer that cannot install, start or run gets its error in the results, the others go on.
Writes its section of benchmarks/RESULTS.md, benchmarks/plots/concurrency.png and the raw per-request results in
benchmarks/out/serving/concurrency.json (a --quick run writes all three under benchmarks/out/serving/ instead).

    bash benchmarks/serving/install_peers.sh                     # once: vLLM (CPU) and llama-cpp-python venvs
    .venv/bin/python -m benchmarks.serving.concurrency           # full run
    .venv/bin/python -m benchmarks.serving.concurrency --quick   # smoke run: fewer tokens per request
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from benchmarks.serving import assets
from benchmarks.serving.metrics import summarize
from benchmarks.serving.peers import LlamaCppPeer, LoraservePeer, Peer, VLLMPeer
from benchmarks.serving.peers.base import LOGS_DIR
from benchmarks.serving.report import number, peer_lines, ratio
from benchmarks.serving.workload import TimedRequest, WorkloadSpec, generate

BENCH = Path(__file__).resolve().parents[1]
HEADING = "## Concurrency against peers: one stream and 32 at once, default model"
OURS = "loraserve"
BATCH = 32  # requests sent at once, distinct adapters among them, and LoRA slots of every multi-LoRA peer
WARMUP_TOKENS = 4
# --peers names (those of install_peers.sh); the multi-LoRA ones run every row, the others only the single stream
CHOICES: dict[str, type[Peer]] = {"loraserve": LoraservePeer, "vllm": VLLMPeer, "llamacpp": LlamaCppPeer}
MULTI_LORA = {"loraserve", "vllm"}
COLORS = ["#3b7dd8", "#d8843b", "#4a9a4a"]


@dataclass(frozen=True)
class Row:
    """`requests` sent at once, on the base model or request i on adapter i of the fleet on `targets`."""

    key: str
    requests: int
    targets: tuple[str, ...] | None  # None = base model
    multi_lora_only: bool

    @property
    def adapters(self) -> str:
        if self.targets is None:
            return "base model"
        return f"{self.requests} adapters on {','.join(t.removesuffix('_proj') for t in self.targets)}"

    @property
    def label(self) -> str:
        return f"{'1 request' if self.requests == 1 else f'{self.requests} at once'}, {self.adapters}"


ROWS = (Row("single", 1, None, False), Row("base", BATCH, None, True),
        Row("all", BATCH, assets.ALL_TARGETS, True), Row("qv", BATCH, ("q_proj", "v_proj"), True))
FLEETS = list(dict.fromkeys(row.targets for row in ROWS if row.targets))  # each served as BATCH adapters, in order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="+", choices=list(CHOICES), default=list(CHOICES))
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer new tokens per request")
    parser.add_argument("--new-tokens", type=int, default=64, help="output tokens of every request")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[10, 16], help="prompt length range")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each row; the median is reported")
    parser.add_argument("--deadline", type=float, default=600.0,
                        help="seconds one run may take; requests not answered by then count as failed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens = 16
    return args


def requests_of(row: Row, args: argparse.Namespace) -> list[TimedRequest]:
    """The row's requests, all arriving at once (the spec's rate only spaces arrivals, which are overwritten)."""
    spec = WorkloadSpec(row.requests if row.targets else 0, "distinct" if row.targets else "base", 1.0, row.requests,
                        tuple(args.prompt_tokens), (args.new_tokens, args.new_tokens), seed=args.seed)
    offset = FLEETS.index(row.targets) * BATCH if row.targets else 0
    return [dataclasses.replace(r, arrival_s=0.0, adapter=None if r.adapter is None else offset + r.adapter)
            for r in generate(spec)]


def timed_run(peer: Peer, row: Row, requests: list[TimedRequest], deadline_s: float) -> dict:
    """One run of a row: its summary, the output tokens it got and the raw per-request results."""
    results, wall = peer.run(requests, deadline_s)
    summary = summarize(results, wall)
    tokens = sum(r.output_tokens for r in results if r.ok)
    print(f"   {row.label}: {summary.completed}/{summary.requests} ok, {tokens} tokens, "
          f"{summary.out_tok_per_s:.1f} tok/s, TPOT p50 {summary.tpot['p50'] * 1e3:.0f} ms "
          f"{summary.first_error[:200]}", flush=True)
    return {"summary": dataclasses.asdict(summary), "tokens": tokens,
            "results": [dataclasses.asdict(r) for r in results]}


def _median(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def run_peer(choice: str, fleet: list[Path], args: argparse.Namespace) -> tuple[str, dict]:
    """The peer's name and its version, command, per-row medians and runs, or its error."""
    peer = CHOICES[choice](slots=BATCH)
    rows = [row for row in ROWS if choice in MULTI_LORA or not row.multi_lora_only]
    entry: dict = {"version": peer.version(), "command": "", "error": "", "rows": {}}
    print(f"== {peer.name}: {entry['version']}", flush=True)
    try:
        started = time.monotonic()
        peer.start(fleet if any(row.targets for row in rows) else [])
        entry["command"], entry["startup_s"] = peer.command(), time.monotonic() - started
        for row in rows:
            requests = requests_of(row, args)
            peer.run([dataclasses.replace(r, output_tokens=WARMUP_TOKENS) for r in requests], args.deadline)
            runs = [timed_run(peer, row, requests, args.deadline) for _ in range(args.repeats)]
            entry["rows"][row.key] = {
                "label": row.label, "expected_tokens": len(requests) * args.new_tokens,
                "tokens": min(run["tokens"] for run in runs),
                "tok_per_s": _median([run["summary"]["out_tok_per_s"] for run in runs]),
                "tpot_ms": _median([run["summary"]["tpot"]["p50"] * 1e3 for run in runs]), "runs": runs}
    except Exception as error:  # noqa: BLE001 - any failure of a peer is reported, the others still run
        entry["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    finally:
        peer.stop()
    return peer.name, entry


def _cell(rows: dict, row: Row) -> list[str]:
    """tok/s (with the tokens got, where a run got fewer than asked) and TPOT of one peer on one row."""
    if row.key not in rows:
        return ["-", "-"]
    got = rows[row.key]
    short = f" ({got['tokens']}/{got['expected_tokens']} tokens)" if got["tokens"] < got["expected_tokens"] else ""
    return [number(got["tok_per_s"], 1) + short, number(got["tpot_ms"], 1)]


def _tok(record: dict, name: str, row: Row) -> float:
    got = record["peers"][name]["rows"].get(row.key)
    return got["tok_per_s"] if got else math.nan


def _base_of(row: Row) -> Row:
    return next(r for r in ROWS if r.targets is None and r.requests == row.requests)


def _tables(record: dict) -> list[str]:
    names = list(record["peers"])
    others = [name for name in names if name != OURS] if OURS in names else []
    lines = ["| row | " + " | ".join(f"{name} tok/s | {name} TPOT ms" for name in names)
             + "".join(f" | {OURS} / {name}" for name in others) + " |",
             "|---" * (1 + 2 * len(names) + len(others)) + "|"]
    for row in ROWS:
        cells = [cell for name in names for cell in _cell(record["peers"][name]["rows"], row)]
        cells += [number(ratio(_tok(record, OURS, row), _tok(record, name, row))) for name in others]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    adapter_rows = [row for row in ROWS if row.targets]
    lines += ["", "Adapters against the base model, tok/s over tok/s of the same number of requests:", "",
              "| peer | " + " | ".join(f"{row.adapters} / base" for row in adapter_rows) + " |",
              "|---" * (1 + len(adapter_rows)) + "|"]
    for name in names:
        if any(row.key in record["peers"][name]["rows"] for row in adapter_rows):
            lines.append(f"| {name} | " + " | ".join(
                number(ratio(_tok(record, name, row), _tok(record, name, _base_of(row)))) for row in adapter_rows) + " |")
    return lines


def plot(record: dict, path: Path) -> None:
    """Output tok/s as bars, one group per row and one bar per peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["peers"])
    width = 0.8 / max(1, len(names))
    figure, axis = plt.subplots(figsize=(9, 4.2))
    for i, name in enumerate(names):
        rows = record["peers"][name]["rows"]
        shown = [k for k, row in enumerate(ROWS) if row.key in rows]
        bars = axis.bar([k + (i - (len(names) - 1) / 2) * width for k in shown],
                        [rows[ROWS[k].key]["tok_per_s"] for k in shown], width, label=name,
                        color=COLORS[i % len(COLORS)])
        axis.bar_label(bars, fmt="%.0f", fontsize=7)
    axis.set_xticks(range(len(ROWS)), labels=[row.label.replace(", ", "\n") for row in ROWS], fontsize=8)
    axis.set(ylabel="output tokens/s", title=f"Gemma 3 270M, {os.cpu_count()} CPU cores, "
                                             f"{record['args']['new_tokens']} new tokens per request")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(record: dict) -> None:
    """The section (RESULTS.md, or a file of its own for a --quick run) and its plot."""
    args, quick = record["args"], record["args"]["quick"]
    results = LOGS_DIR / "concurrency-quick.md" if quick else BENCH / "RESULTS.md"
    figure = (LOGS_DIR / "plots" if quick else BENCH / "plots") / "concurrency.png"
    command = shlex.join([".venv/bin/python", "-m", "benchmarks.serving.concurrency", *record["argv"]])
    lines = [
        f"{HEADING} ({record['date']}{', quick smoke run' if quick else ''})", "",
        f"- Machine: {assets.machine()}; every peer alone on it in turn, the load client on the same cores.",
        f"- Command: `{command}` (after `bash benchmarks/serving/install_peers.sh`).",
        "- Model: Gemma 3 270M, the bundled Q4_K_M GGUF: loraserve serves it in bf16, vLLM gets it dequantized to an "
        "HF folder and runs it in bf16, llama.cpp runs the Q4_K_M weights themselves (and no LoRA).",
        f"- Workload: prompts of {args['prompt_tokens'][0]}-{args['prompt_tokens'][1]} tokens (seed {args['seed']}), "
        f"{args['new_tokens']} new tokens per request, greedy, EOS ignored, streamed `/v1/completions`; a row's "
        "requests are all sent at once (closed batch). tok/s = output tokens over the wall time from sending to the "
        "last answer; TPOT = (E2E - TTFT) / (tokens - 1), p50 over the row's requests. Before each row a pass of its "
        f"requests cut to {WARMUP_TOKENS} tokens (warm-up, and every adapter of the row in a slot); then "
        f"{args['repeats']} timed runs, median reported.",
        f"- Adapters: random rank-16 PEFT adapters on every layer, {BATCH} distinct ones per adapter row (request i on "
        "adapter i), on all seven projections or on q/v only (PEFT's default targets); vLLM registers both fleets "
        "at start, loraserve reads each adapter from its folder on first use. "
        f"{BATCH} LoRA slots for every multi-LoRA peer (loraserve `--max-active-adapters {BATCH}`, vLLM "
        f"`--max-loras {BATCH} --max-lora-rank 16`), so a row's adapters share every decode step. llama.cpp runs only "
        "the one-request row: its server serializes requests and applies one LoRA to all of them.", "",
        "### Peers", "",
    ]
    lines += peer_lines(record)
    lines += ["", "### Results", "", f"{OURS} / peer is output tok/s over output tok/s: above 1 is in our favour.", "",
              *_tables(record), "", f"![tok/s per row and peer]({os.path.relpath(figure, results.parent)})", ""]
    if quick:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text("\n".join(lines))
    else:
        assets.replace_section(HEADING, lines)
    plot(record, figure)
    print(f"wrote {results} and {figure}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fleet: list[Path] = []
    if MULTI_LORA & set(args.peers):
        model_dir = assets.hf_model_dir()
        fleet = [path for targets in FLEETS for path in assets.adapter_fleet(BATCH, model_dir, targets)]
    date = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M")
    peers = dict(run_peer(choice, fleet, args) for choice in args.peers)
    record = {"date": date, "args": vars(args), "argv": sys.argv[1:] if argv is None else argv, "peers": peers}
    LOGS_DIR.mkdir(parents=True, exist_ok=True)
    raw = LOGS_DIR / ("concurrency-quick.json" if args.quick else "concurrency.json")
    raw.write_text(json.dumps(record, indent=1))
    write(record)


if __name__ == "__main__":
    main()
