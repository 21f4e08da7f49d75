"""The serving workload, S-LoRA / Punica style: a seed fixes every request's arrival time, adapter, prompt and output
length, so each peer is sent the very same trace (and a trace saved as JSONL can be replayed later).

Arrivals are a Gamma process with total rate R and coefficient of variation cv (cv = 1 is Poisson; inter-arrival
shape 1/cv², scale cv²/R, as in S-LoRA). Popularity over n adapters: `distinct` (request i uses adapter i mod n),
`uniform`, `zipf` (adapter of rank k drawn with probability proportional to k^-s), `identical` (all adapter 0), or
`base` (no adapter, the reference without LoRA). Prompt and output lengths are uniform on [lo, hi] tokens.
Pure Python so the trace does not depend on a NumPy version.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

POPULARITIES = ("distinct", "uniform", "zipf", "identical", "base")
# common English words that Gemma's tokenizer keeps as one token each (with their leading space), so a prompt of w
# words is about w + 1 tokens (BOS) on every peer without the generator needing a tokenizer
WORDS = ("the of and to in is was for on that with as by at from his her they this are be have one all were we when "
         "there can an which their if has will so about out up them some what would time more into other than then "
         "now only could people first new like over also back after use two how our work way even because any these "
         "day most us water long find here thing many well part great where help through much before line right too "
         "mean old same tell boy follow came want show around form three small set put end does another large must "
         "big such turn move live real life few north open seem together next white children begin got walk example "
         "paper group always music those both mark often letter until mile river car feet care second book carry "
         "took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face "
         "wood main enough plain girl usual young ready above ever red list though feel talk bird soon body dog "
         "family direct pose leave song measure door product black short class wind question happen complete ship "
         "area half rock order fire south problem piece told knew pass since top whole king space heard best hour "
         "better true during hundred five remember step early hold west ground interest reach fast verb sing listen "
         "six table travel less morning ten simple several vowel toward war lay against pattern slow center love "
         "person money serve appear road map rain rule govern pull cold notice voice unit power town fine certain "
         "fly fall lead cry dark machine note wait plan figure star box noun field rest correct able pound done "
         "beauty drive stood contain front teach week final gave green quick develop ocean warm free minute strong "
         "special mind behind clear tail produce fact street inch multiply nothing course stay wheel full force "
         "blue object decide surface deep moon island foot system busy test record boat common gold possible plane "
         "stead dry wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes "
         "distant fill east paint language among").split()


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a trace; `label` names it in tables."""

    adapters: int
    popularity: str
    rate: float
    requests: int
    prompt_tokens: tuple[int, int] = (8, 256)
    output_tokens: tuple[int, int] = (8, 128)
    cv: float = 1.0
    zipf_s: float = 1.5
    seed: int = 0

    @property
    def label(self) -> str:
        who = "base model" if self.popularity == "base" else f"{self.adapters} adapters, {self.popularity}"
        return f"{who}, {self.rate:g} req/s"


@dataclass(frozen=True)
class TimedRequest:
    index: int
    arrival_s: float  # seconds after the start of the run
    adapter: int | None  # index into the adapter fleet; None = base model
    prompt: str
    prompt_words: int
    output_tokens: int  # generated with EOS ignored, so every peer does the same work


def generate(spec: WorkloadSpec) -> list[TimedRequest]:
    """The trace of `spec`; the same spec always gives the same list."""
    if spec.popularity not in POPULARITIES:
        raise ValueError(f"popularity must be one of {POPULARITIES}, got {spec.popularity!r}")
    rng = random.Random(spec.seed)
    shape, scale = 1 / spec.cv**2, spec.cv**2 / spec.rate
    clock = 0.0
    picks = _adapter_picks(spec, rng)
    requests = []
    for index in range(spec.requests):
        words = rng.randint(*spec.prompt_tokens) - 1  # minus the BOS token
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        requests.append(TimedRequest(index, round(clock, 6), next(picks), prompt, words,
                                     rng.randint(*spec.output_tokens)))
        clock += rng.gammavariate(shape, scale)
    return requests


def _adapter_picks(spec: WorkloadSpec, rng: random.Random) -> Iterator[int | None]:
    n = spec.adapters
    if spec.popularity == "base":
        return itertools.repeat(None)
    if spec.popularity == "identical":
        return itertools.repeat(0)
    if spec.popularity == "distinct":
        return itertools.cycle(range(n))
    weights = [1.0] * n if spec.popularity == "uniform" else [k ** -spec.zipf_s for k in range(1, n + 1)]
    cumulative = list(itertools.accumulate(weights))
    # a seeded shuffle of the ranks, so the most popular adapter is not always adapter 0 across specs
    order = list(range(n))
    random.Random(spec.seed + 1).shuffle(order)
    return (order[bisect.bisect(cumulative, rng.random() * cumulative[-1])] for _ in itertools.count())


def save(requests: list[TimedRequest], path: Path) -> None:
    """One request per line, to replay the trace against another server later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in requests))


def load(path: Path) -> list[TimedRequest]:
    return [TimedRequest(**json.loads(line)) for line in path.read_text().splitlines() if line]
