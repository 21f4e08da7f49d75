"""Serving benchmark (issue 7): every available peer answers the same seeded traces, one peer at a time, on this
machine. Sweeps the number of adapters (Zipf and uniform popularity, plus the base model) at one arrival rate, and the
arrival rate at 32 adapters; writes benchmarks/results/serving.md, three plots in benchmarks/plots/, and the raw
per-request results in benchmarks/out/serving/. A peer that cannot install, start or run gets its error in the file.

    bash benchmarks/serving/install_peers.sh            # once: vLLM (CPU) and llama-cpp-python venvs
    .venv/bin/python -m benchmarks.serving.run          # full run, about 40 minutes on 2 cores
    .venv/bin/python -m benchmarks.serving.run --quick  # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import traceback

from benchmarks.serving import assets, report
from benchmarks.serving.metrics import summarize
from benchmarks.serving.peers import PEERS
from benchmarks.serving.peers.base import LOGS_DIR
from benchmarks.serving.workload import WorkloadSpec, generate, save


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny counts, short lengths")
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS))
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32, 128, 1000])
    parser.add_argument("--popularities", nargs="+", default=["zipf", "uniform"])
    parser.add_argument("--rate", type=float, default=2.0, help="req/s of the adapter sweep")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--rate-adapters", type=int, default=32, help="adapters (Zipf) in the rate sweep")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--drain", type=float, default=45.0, help="seconds allowed after the last arrival")
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[8, 256])
    parser.add_argument("--output-tokens", type=int, nargs=2, default=[8, 128])
    parser.add_argument("--cv", type=float, default=1.0, help="arrival burstiness (1 = Poisson)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.adapters, args.popularities, args.rate, args.rates = [1, 8], ["zipf"], 1.0, [1.0, 2.0]
        args.rate_adapters, args.duration, args.min_requests, args.drain = 8, 6.0, 4, 30.0
        args.prompt_tokens, args.output_tokens = [8, 32], [4, 16]
    return args


def workloads(args: argparse.Namespace) -> list[tuple[str, WorkloadSpec]]:
    """(sweep, spec) pairs; with one adapter every popularity is the same trace, so it runs once as `identical`."""
    def spec(adapters: int, popularity: str, rate: float) -> WorkloadSpec:
        return WorkloadSpec(adapters, popularity, rate, max(args.min_requests, math.ceil(rate * args.duration)),
                            tuple(args.prompt_tokens), tuple(args.output_tokens), args.cv, seed=args.seed)

    runs = [("adapters", spec(0, "base", args.rate))]
    for count in args.adapters:
        for popularity in ["identical"] if count == 1 else args.popularities:
            runs.append(("adapters", spec(count, popularity, args.rate)))
    runs += [("rate", spec(args.rate_adapters, "zipf", rate)) for rate in args.rates]
    unique = {}
    for sweep, item in runs:  # a spec in both sweeps runs once, and counts for both
        unique.setdefault(item, []).append(sweep)
    return [(",".join(sweeps), item) for item, sweeps in unique.items()]


def run_peer(name: str, runs: list[tuple[str, WorkloadSpec]], args: argparse.Namespace) -> dict:
    """The peer's version, command, per-run summaries and raw results, or its error."""
    peer = PEERS[name]()
    entry: dict = {"version": peer.version(), "command": "", "runs": [], "error": ""}
    fleet = assets.adapter_fleet(max(args.adapters + [args.rate_adapters]), assets.hf_model_dir())
    print(f"== {name}: {entry['version']}", flush=True)
    try:
        started = time.monotonic()
        peer.start(fleet)
        entry["command"] = peer.command()
        entry["startup_s"] = time.monotonic() - started
        warmup = generate(WorkloadSpec(1, "identical", 10.0, 2, (8, 16), (4, 4), seed=99))
        peer.run(warmup, 120.0)
        for sweep, spec in runs:
            if not peer.supports(spec):
                continue
            requests = generate(spec)
            print(f"-- {name}: {spec.label} ({len(requests)} requests)", flush=True)
            results, wall = peer.run(requests, requests[-1].arrival_s + args.drain)
            summary = summarize(results, wall)
            print(f"   {summary.completed}/{summary.requests} ok, {summary.out_tok_per_s:.1f} tok/s, "
                  f"TTFT p50 {summary.ttft['p50']:.2f} s {summary.first_error[:200]}", flush=True)
            entry["runs"].append({"sweep": sweep, "spec": dataclasses.asdict(spec), "label": spec.label,
                                  "summary": dataclasses.asdict(summary),
                                  "results": [dataclasses.asdict(r) for r in results]})
    except Exception as error:  # noqa: BLE001 - any failure of a peer is reported, the others still run
        entry["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    finally:
        peer.stop()
    return entry


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = workloads(args)
    for _, spec in runs:
        save(generate(spec), LOGS_DIR / "traces" / f"{spec.label.replace(', ', '_').replace(' ', '-')}.jsonl")
    peers = {name: run_peer(name, runs, args) for name in args.peers}
    record = {"args": vars(args), "argv": sys.argv[1:], "peers": peers}
    (LOGS_DIR / ("results-quick.json" if args.quick else "results.json")).write_text(json.dumps(record, indent=1))
    report.write(record)


if __name__ == "__main__":
    main()
