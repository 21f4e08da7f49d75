"""Summary of one run, with the numbers the S-LoRA / vLLM benchmarks report: throughput (req/s, output tok/s),
TTFT / TPOT / end-to-end percentiles and SLO attainment (a failed request misses every SLO)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from benchmarks.serving.client import RequestResult

# S-LoRA's SLO is TTFT < 6 s; the interactive one asks for a chat-like first token and reading speed after it
SLOS = {"ttft<6s": (6.0, math.inf), "ttft<1s,tpot<100ms": (1.0, 0.1)}


@dataclass
class Summary:
    requests: int
    completed: int
    wall_s: float
    req_per_s: float
    out_tok_per_s: float
    ttft: dict[str, float]  # seconds: p50, p90, p99, mean
    tpot: dict[str, float]
    e2e: dict[str, float]
    slo: dict[str, float]  # fraction of all requests meeting each SLO
    first_error: str


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (NumPy's default), NaN for no values."""
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    position = (len(data) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def _stats(values: list[float]) -> dict[str, float]:
    clean = [v for v in values if not math.isnan(v)]
    return {"p50": percentile(clean, 50), "p90": percentile(clean, 90), "p99": percentile(clean, 99),
            "mean": sum(clean) / len(clean) if clean else math.nan}


def summarize(results: list[RequestResult], wall_s: float) -> Summary:
    done = [r for r in results if r.ok]
    slo = {name: sum(1 for r in done if r.ttft_s < ttft and (r.output_tokens <= 1 or r.tpot_s < tpot))
           / max(1, len(results)) for name, (ttft, tpot) in SLOS.items()}
    errors = [r.error for r in results if not r.ok]
    return Summary(len(results), len(done), wall_s, len(done) / wall_s, sum(r.output_tokens for r in done) / wall_s,
                   _stats([r.ttft_s for r in done]), _stats([r.tpot_s for r in done]),
                   _stats([r.e2e_s for r in done]), slo, errors[0] if errors else "")
