"""One server against Ray Serve with 1 and 2 engine replicas, on the same seeded multi-adapter trace: throughput,
latency, and where each adapter was loaded. The default model in bf16, rank-16 adapters on all seven projections,
named by their local folder; the Ray runs through `loraserve serve --ray-replicas N`, which gives each replica its
share of the machine's cores.

    .venv/bin/python -m benchmarks.ray_replicas            # writes its section of benchmarks/RESULTS.md and a plot
    .venv/bin/python -m benchmarks.ray_replicas --quick    # smoke run

On one machine the replicas share its cores, so this measures what Ray's ingress and a split batch cost and how
well adapters stay on one replica; it cannot show the gain of replicas on machines of their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.serving import assets
from benchmarks.serving.metrics import Summary, summarize
from benchmarks.serving.peers.loraserve_peer import LoraservePeer
from benchmarks.serving.workload import WorkloadSpec, generate

PLOT = Path(__file__).parent / "plots" / "ray_replicas.png"
HEADING = "## Ray Serve replicas against one server, default model"


class RayReplicasPeer(LoraservePeer):
    """The same server command with `--ray-replicas N` (a local Ray started by the server itself)."""

    def __init__(self, replicas: int) -> None:
        super().__init__()
        self.replicas = replicas
        self.name = f"loraserve-ray-{replicas}"

    def server_args(self, fleet: list[Path], port: int) -> tuple[list[str], dict[str, str]]:
        argv, env = super().server_args(fleet, port)
        return [*argv, "--ray-replicas", str(self.replicas)], {**env, "RAY_ADDRESS": ""}


def adapters_per_replica(base_url: str) -> dict[str, int]:
    """Adapters each replica holds, host and device tiers, from `GET /adapters` (the ingress's has a replica_id)."""
    with urllib.request.urlopen(base_url + "/adapters", timeout=30) as response:
        inventory = json.load(response)
    counts: dict[str, int] = {}
    for entry in inventory["adapters"]:
        replica = entry.get("replica_id", "server")
        counts[replica] = counts.get(replica, 0) + 1
    return counts


def run_one(peer: LoraservePeer, fleet: list[Path], spec: WorkloadSpec, drain_s: float) -> dict:
    requests = generate(spec)
    peer.start(fleet)
    try:
        warmup = generate(WorkloadSpec(0, "base", 10.0, 4, (8, 16), (4, 4), seed=99))
        peer.run(warmup, 120.0)
        results, wall = peer.run(requests, requests[-1].arrival_s + drain_s)
        held = adapters_per_replica(peer.base_url)
    finally:
        peer.stop()
    summary = summarize(results, wall)
    print(f"{peer.name}: {summary.completed}/{summary.requests} ok, {summary.out_tok_per_s:.1f} tok/s, "
          f"TTFT p50 {summary.ttft['p50']:.2f} s, adapters held {held} {summary.first_error[:200]}", flush=True)
    return {"name": peer.name, "command": peer.command(), "summary": dataclasses.asdict(summary), "held": held}


def section(runs: list[dict], spec: WorkloadSpec, argv: list[str]) -> list[str]:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M")
    command = " ".join(["python -m benchmarks.ray_replicas", *argv])
    lines = [f"{HEADING} ({stamp})", "", f"`{command}`", "",
             f"Machine: {assets.machine()}.", "",
             f"Workload: {spec.requests} requests, {spec.label}, prompts of {spec.prompt_tokens[0]}-"
             f"{spec.prompt_tokens[1]} tokens, {spec.output_tokens[0]}-{spec.output_tokens[1]} new tokens each "
             f"(greedy, EOS ignored), seed {spec.seed}: the same trace for every row. Command of the first row: "
             f"`{runs[0]['command'].split(' -m ', 1)[-1]}`.", "",
             "| server | completed | output tok/s | vs one server | TTFT p50 / p90 (s) | end-to-end p50 / p90 (s) "
             "| adapters held per replica |", "|---|---:|---:|---:|---|---|---|"]
    base = runs[0]["summary"]["out_tok_per_s"]
    for run in runs:
        s = Summary(**run["summary"])
        held = " + ".join(str(n) for _, n in sorted(run["held"].items())) or "0"
        lines.append(f"| {run['name']} | {s.completed}/{s.requests} | {s.out_tok_per_s:.1f} "
                     f"| {s.out_tok_per_s / base:.2f} | {s.ttft['p50']:.2f} / {s.ttft['p90']:.2f} "
                     f"| {s.e2e['p50']:.2f} / {s.e2e['p90']:.2f} | {held} |")
    lines += ["", "What this can show on one machine: the cost of Ray's proxy, ingress and replica hop against one "
              "process (one server against 1 replica), what splitting one batch into two on the same cores costs "
              "(1 against 2 replicas: each replica decodes a smaller batch on half the threads), and how many "
              "replicas each adapter was loaded on (with affinity, close to one per adapter). What it cannot "
              "show: the throughput of replicas on machines of their own, which is what replicas are for; here "
              "the two share the same cores and memory bandwidth, so their total cannot exceed one server's.", "",
              f"![1 against 2 replicas](plots/{PLOT.name})"]
    return lines


def plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [run["name"] for run in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.bar(names, [run["summary"]["out_tok_per_s"] for run in runs])
    left.set_ylabel("output tokens/s")
    for key, offset, label in (("p50", -0.2, "TTFT p50"), ("p90", 0.2, "TTFT p90")):
        right.bar([i + offset for i in range(len(runs))], [run["summary"]["ttft"][key] for run in runs], 0.4,
                  label=label)
    right.set_xticks(range(len(runs)), names)
    right.set_ylabel("seconds")
    right.legend()
    for axis in (left, right):
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(PLOT, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few requests, short outputs")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rate", type=float, default=4.0, help="arrivals per second (Poisson)")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--drain", type=float, default=240.0, help="seconds allowed after the last arrival")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.drain = 8, 120.0
    output_tokens = (4, 8) if args.quick else (16, 64)
    spec = WorkloadSpec(args.adapters, "zipf", args.rate, args.requests, (8, 128), output_tokens, seed=0)
    fleet = assets.adapter_fleet(args.adapters, assets.hf_model_dir())
    runs = [run_one(peer, fleet, spec, args.drain) for peer in (LoraservePeer(), RayReplicasPeer(1),
                                                                   RayReplicasPeer(2))]
    plot(runs)
    lines = section(runs, spec, sys.argv[1:] if argv is None else argv)
    print("\n".join(lines))
    if not args.quick:
        assets.replace_section(HEADING, lines)


if __name__ == "__main__":
    main()
