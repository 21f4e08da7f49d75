"""The three plots of the serving benchmark: output throughput against the number of adapters, the latency CDFs of
the reference workload, throughput and TTFT against the arrival rate."""

from __future__ import annotations

import math
from pathlib import Path

PLOTS = {"serving_adapters.png": "throughput against adapters", "serving_latency_cdf.png": "latency CDF",
         "serving_rate.png": "throughput against rate"}
TITLE = "Gemma 3 270M, 2 CPU cores"


def _runs(peer: dict, sweep: str) -> list[dict]:
    return [run for run in peer["runs"] if sweep in run["sweep"].split(",")]


def plot_all(record: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    peers = {name: peer for name, peer in record["peers"].items() if peer["runs"]}
    colors = dict(zip(record["peers"], ["#3b7dd8", "#d8843b", "#4a9a4a", "#9a4a9a"]))

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, peer in peers.items():
        runs = _runs(peer, "adapters")
        for popularity, style in (("zipf", "-"), ("uniform", "--")):
            points = sorted((r["spec"]["adapters"], r["summary"]["out_tok_per_s"]) for r in runs
                            if r["spec"]["popularity"] in (popularity, "identical"))
            if len(points) > 1 or (points and popularity == "zipf"):
                label = f"{name}, {popularity}" if len(points) > 1 else f"{name}, one adapter"
                axis.plot(*zip(*points), style, marker="o", color=colors[name], label=label)
        base = [r["summary"]["out_tok_per_s"] for r in runs if r["spec"]["popularity"] == "base"]
        if base:
            axis.axhline(base[0], color=colors[name], linestyle=":", linewidth=1, label=f"{name}, base model")
    axis.set_xscale("log")
    counts = sorted(set(record["args"]["adapters"]))
    axis.set_xticks(counts, labels=[str(c) for c in counts])
    axis.minorticks_off()
    axis.set(xlabel="adapters", ylabel="output tokens/s",
             title=f"{TITLE}, {record['args']['rate']:g} req/s")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "serving_adapters.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    reference = f"{record['args']['rate_adapters']} adapters, zipf, {record['args']['rate']:g} req/s"
    for name, peer in peers.items():
        run = next((r for r in peer["runs"] if r["label"] == reference), None)
        if run is None:
            continue
        for axis, key in zip(axes, ("ttft_s", "e2e_s")):
            values = sorted(r[key] for r in run["results"] if r["ok"] and not math.isnan(r[key]))
            total = len(run["results"])  # failed requests keep the curve below 1
            axis.step(values, [(i + 1) / total for i in range(len(values))], where="post", color=colors[name],
                      label=name)
    for axis, what in zip(axes, ("time to first token", "end-to-end latency")):
        axis.set(xlabel=f"{what} (s)", ylabel="fraction of requests", title=reference)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "serving_latency_cdf.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for name, peer in peers.items():
        points = sorted((r["spec"]["rate"], r["summary"]["out_tok_per_s"], r["summary"]["ttft"]["p50"])
                        for r in _runs(peer, "rate"))
        if points:
            rates, tokens, ttft = zip(*points)
            axes[0].plot(rates, tokens, marker="o", color=colors[name], label=name)
            axes[1].plot(rates, ttft, marker="o", color=colors[name], label=name)
    axes[0].set(xlabel="arrival rate (req/s)", ylabel="output tokens/s")
    axes[1].set(xlabel="arrival rate (req/s)", ylabel="TTFT p50 (s)", yscale="log")
    for axis in axes:
        axis.set_title(f"{TITLE}, {record['args']['rate_adapters']} adapters, zipf", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(folder / "serving_rate.png", dpi=120)
    plt.close(figure)
