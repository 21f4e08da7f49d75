"""Adapter affinity across replicas: how often an adapter's request finds it already loaded, and how many adapter loads
per second the fleet does, for Ray Serve's multiplexed routing against random routing (and a rendezvous hash).

A pure simulation first (no Ray): N replicas, M adapters with Zipf popularity, Poisson arrivals, exponential service
times, each replica an LRU of K adapters (what `@serve.multiplexed(max_num_models_per_replica=K)` keeps).
Policies:
  - random: a uniformly random replica.
  - affinity (Ray's multiplexing): the least loaded of two random replicas among those holding the adapter and
    below `max_ongoing_requests`; if none, among the replicas holding the fewest adapters; if all are full, the
    least loaded. The router's view is exact here (Ray's lags by ~0.1-0.5 s; `--ray` measures that).
  - hash: rendezvous hashing on the adapter id (llm-d's / Dynamo's "home" replica), the next replica in its order
    when the home is full.

With `--ray`, the same trace (time-scaled) replayed open-loop through a real local Ray Serve deployment of N
stand-in replicas (no model: each request loads its adapter into the replica's multiplexed LRU, then sleeps its
service time), counting real loads for: Ray's default router with the multiplexed id, loraserve's
`AdapterAffinityRouter` (which counts an adapter as held from the moment it routes it), and no multiplexed id
(Ray's power-of-two on queue length alone).

    .venv/bin/python benchmarks/ray_affinity.py            # simulation: table, plot, markdown section
    .venv/bin/python benchmarks/ray_affinity.py --ray      # plus the Ray measurement (~1-2 minutes)

Writes its section of benchmarks/RESULTS.md (and prints it); saves benchmarks/plots/ray_affinity.png.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from results_file import machine, replace_section

PLOT = Path(__file__).parent / "plots" / "ray_affinity.png"
HEADING = "## Adapter affinity across replicas (Ray Serve multiplexing)"
POLICIES = ("random", "affinity", "hash")


@dataclass(frozen=True)
class Trace:
    arrivals: np.ndarray  # seconds, increasing
    adapters: np.ndarray  # adapter index per request
    services: np.ndarray  # seconds per request

    @property
    def duration(self) -> float:
        return float(self.arrivals[-1] - self.arrivals[0]) or 1.0


def zipf_trace(adapters: int, exponent: float, requests: int, rate: float, service_s: float, seed: int) -> Trace:
    """Requests over `adapters` adapters, the k-th most popular with weight k**-exponent (popularity ranks shuffled
    over the ids), Poisson arrivals at `rate` per second, exponential service times of mean `service_s`."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, adapters + 1, dtype=np.float64) ** -exponent
    ids = rng.permutation(adapters)[rng.choice(adapters, size=requests, p=weights / weights.sum())]
    return Trace(np.cumsum(rng.exponential(1.0 / rate, requests)), ids, rng.exponential(service_s, requests))


@dataclass
class Outcome:
    hit_rate: float
    loads_per_s: float
    busiest_share: float  # share of the requests on the busiest replica (1/N = even)
    replicas_per_adapter: float  # mean over adapters of the replicas that ever loaded it


def _rendezvous(adapter: int, replicas: int) -> list[int]:
    scores = [hashlib.blake2b(f"{adapter}/{r}".encode(), digest_size=8).digest() for r in range(replicas)]
    return sorted(range(replicas), key=lambda r: scores[r], reverse=True)


def simulate(trace: Trace, replicas: int, capacity: int, policy: str, max_ongoing: int, seed: int = 0) -> Outcome:
    rng = random.Random(seed)
    lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]
    finishing: list[list[float]] = [[] for _ in range(replicas)]  # completion times of requests in flight
    served = [0] * replicas
    loaded_on: dict[int, set[int]] = {}
    hits = 0
    homes: dict[int, list[int]] = {}

    def ongoing(r: int) -> int:
        return len(finishing[r])

    def least_of_two(candidates: list[int]) -> int:
        if len(candidates) <= 2:
            return min(candidates, key=ongoing)
        return min(rng.sample(candidates, 2), key=ongoing)

    for t, adapter, service in zip(trace.arrivals, trace.adapters, trace.services):
        for r in range(replicas):
            while finishing[r] and finishing[r][0] <= t:
                heapq.heappop(finishing[r])
        adapter = int(adapter)
        if policy == "random":
            choice = rng.randrange(replicas)
        elif policy == "affinity":
            open_ = [r for r in range(replicas) if ongoing(r) < max_ongoing]
            holders = [r for r in open_ if adapter in lru[r]]
            if holders:
                choice = least_of_two(holders)
            elif open_:
                fewest = min(len(lru[r]) for r in open_)
                choice = least_of_two([r for r in open_ if len(lru[r]) == fewest])
            else:
                choice = min(range(replicas), key=ongoing)
        elif policy == "hash":
            order = homes.setdefault(adapter, _rendezvous(adapter, replicas))
            choice = next((r for r in order if ongoing(r) < max_ongoing), order[0])
        else:
            raise ValueError(policy)
        cache = lru[choice]
        if adapter in cache:
            hits += 1
            cache.move_to_end(adapter)
        else:
            if len(cache) >= capacity:
                cache.popitem(last=False)
            cache[adapter] = None
            loaded_on.setdefault(adapter, set()).add(choice)
        served[choice] += 1
        heapq.heappush(finishing[choice], t + service)
    n = len(trace.adapters)
    return Outcome(hits / n, (n - hits) / trace.duration, max(served) / n,
                   float(np.mean([len(s) for s in loaded_on.values()])))


# ---------------------------------------------------------------------------------------------------------------
# The same trace through a real Ray Serve deployment


def measure_with_ray(trace: Trace, replicas: int, capacity: int, max_ongoing: int) -> dict[str, tuple[int, float]]:
    """Adapter loads (and requests per second achieved) for each routing mode, replaying `trace` open-loop."""
    import asyncio

    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from loraserve.serving.ray_app import AdapterAffinityRouter

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class StandIn:
        def __init__(self, capacity: int) -> None:
            self.loads = 0

            async def load(adapter: str) -> str:
                self.loads += 1
                return adapter

            self.get = serve.multiplexed(max_num_models_per_replica=capacity)(load)

        async def __call__(self, adapter: str, service_s: float) -> None:
            await self.get(adapter)
            await asyncio.sleep(service_s)

        def stats(self) -> int:
            return self.loads

    modes = {
        "Ray multiplexing, default router": (True, None),
        "Ray multiplexing, AdapterAffinityRouter": (True, AdapterAffinityRouter),
        "no multiplexed id (power of two)": (False, None),
    }
    results = {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 << 20,
             log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        for index, (label, (multiplexed, router)) in enumerate(modes.items()):
            options: dict = {"num_replicas": replicas, "max_ongoing_requests": max_ongoing}
            if router is not None:
                options["request_router_config"] = RequestRouterConfig(request_router_class=router)
            name = f"affinity-{index}"
            handle = serve.run(StandIn.options(**options).bind(capacity), name=name, route_prefix=None)

            async def replay() -> float:
                start = time.monotonic()
                t0 = float(trace.arrivals[0])
                tasks = []
                for t, adapter, service in zip(trace.arrivals, trace.adapters, trace.services):
                    delay = (float(t) - t0) - (time.monotonic() - start)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    h = handle.options(multiplexed_model_id=f"a{adapter}") if multiplexed else handle
                    tasks.append(asyncio.ensure_future(h.remote(f"a{adapter}", float(service))))
                await asyncio.gather(*tasks)
                return len(tasks) / (time.monotonic() - start)

            achieved = asyncio.run(replay())
            loads = sum(serve.get_app_handle(name).broadcast("stats").results())
            results[label] = (loads, achieved)
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=16, help="adapters per replica (its LRU)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[8, 32, 128, 512, 2048])
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second, fleet-wide")
    parser.add_argument("--service-s", type=float, default=1.0, help="mean service time per request")
    parser.add_argument("--max-ongoing", type=int, default=32, help="requests per replica before it counts as full")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray", action="store_true", help="also replay one trace through a local Ray Serve")
    parser.add_argument("--ray-adapters", type=int, default=128)
    parser.add_argument("--ray-requests", type=int, default=2000)
    parser.add_argument("--ray-speedup", type=float, default=4.0, help="replay the trace this much faster")
    args = parser.parse_args()

    rows = []
    for m in args.adapters:
        trace = zipf_trace(m, args.zipf, args.requests, args.rate, args.service_s, args.seed)
        outcomes = {p: simulate(trace, args.replicas, args.capacity, p, args.max_ongoing, args.seed) for p in POLICIES}
        rows.append((m, outcomes))
    setup = (f"{args.replicas} replicas x LRU of {args.capacity} adapters, Zipf s={args.zipf}, {args.rate:g} req/s "
             f"Poisson, mean service {args.service_s:g} s, max {args.max_ongoing} ongoing per replica, "
             f"{args.requests} requests, seed {args.seed}")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M")
    lines = [f"{HEADING} ({stamp})", "",
             f"`python benchmarks/ray_affinity.py{' --ray' if args.ray else ''}`; machine: {machine()}.", "",
             f"Simulated: {setup}.", "",
             "| adapters | hit rate random | hit rate affinity | hit rate hash | loads/s random | loads/s affinity "
             "| loads/s hash | busiest replica's share (random / affinity / hash) | replicas per adapter "
             "(random / affinity / hash) |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for m, o in rows:
        lines.append(
            f"| {m} | {o['random'].hit_rate:.1%} | {o['affinity'].hit_rate:.1%} | {o['hash'].hit_rate:.1%} "
            f"| {o['random'].loads_per_s:.2f} | {o['affinity'].loads_per_s:.2f} | {o['hash'].loads_per_s:.2f} "
            f"| {o['random'].busiest_share:.2f} / {o['affinity'].busiest_share:.2f} / {o['hash'].busiest_share:.2f} "
            f"| {o['random'].replicas_per_adapter:.2f} / {o['affinity'].replicas_per_adapter:.2f} / "
            f"{o['hash'].replicas_per_adapter:.2f} |")

    if args.ray:
        trace = zipf_trace(args.ray_adapters, args.zipf, args.ray_requests, args.rate, args.service_s, args.seed)
        fast = Trace(trace.arrivals / args.ray_speedup, trace.adapters, trace.services / args.ray_speedup)
        simulated = {p: simulate(fast, args.replicas, args.capacity, p, args.max_ongoing, args.seed) for p in POLICIES}
        started = time.monotonic()
        measured = measure_with_ray(fast, args.replicas, args.capacity, args.max_ongoing)
        n = args.ray_requests
        lines += ["", f"Measured through a local Ray Serve 2.60 ({args.replicas} stand-in replicas with "
                      f"`@serve.multiplexed(max_num_models_per_replica={args.capacity})`, no model), the trace of "
                      f"{args.ray_adapters} adapters and {n} requests replayed open-loop {args.ray_speedup:g}x "
                      f"faster ({args.rate * args.ray_speedup:g} req/s, mean service "
                      f"{args.service_s / args.ray_speedup * 1e3:.0f} ms); {time.monotonic() - started:.0f} s:", "",
                  "| routing | adapter loads | hit rate | requests/s achieved |", "|---|---:|---:|---:|"]
        for label, (loads, achieved) in measured.items():
            lines.append(f"| {label} | {loads} | {1 - loads / n:.1%} | {achieved:.0f} |")
        for policy in POLICIES:
            loads = round((1 - simulated[policy].hit_rate) * n)
            lines.append(f"| simulated: {policy} | {loads} | {simulated[policy].hit_rate:.1%} | |")

    _plot(rows, setup)
    lines += ["", f"![adapter affinity](plots/{PLOT.name})"]
    print("\n".join(lines))
    replace_section(HEADING, lines)


def _plot(rows: list, setup: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapters = [m for m, _ in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy, style in zip(POLICIES, ("o--", "o-", "s:")):
        left.plot(adapters, [o[policy].hit_rate * 100 for _, o in rows], style, label=policy)
        right.plot(adapters, [o[policy].loads_per_s for _, o in rows], style, label=policy)
    for axis, label in ((left, "adapter cache hit rate (%)"), (right, "adapter loads per second, fleet")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("distinct adapters (Zipf popularity)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(setup, fontsize=8)
    figure.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(PLOT, dpi=120)


if __name__ == "__main__":
    main()
