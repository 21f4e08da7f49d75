"""The batched sampler: penalties, warpers and the draw for rows with different parameters in one step.

Every operation runs on the whole batch (or the subset of rows that asked for it) with torch; Python loops are per
row (building index lists and parameter vectors), never per vocabulary entry.

Order, as in HF/TGI: penalties (repetition, then frequency/presence) on the raw logits; greedy rows take the argmax
of the penalized logits; sampled rows go through temperature, top-k, top-p, typical-p, then min-p, and draw.

Rows with a grammar first lose their disallowed tokens (logits set to -inf in place, from the step's bitmask), before
penalties and the draw; rows without one are not touched, so their results do not depend on who shares the batch.

Reported logprobs are the log-softmax of the RAW model logits (vLLM's default `raw_logprobs`), not of the penalized or
warped distribution, so they describe the model whatever the request's decoding parameters; for a constrained row they
are taken after the grammar mask, as in vLLM (the model restricted to what the grammar allows).

Seeded rows draw their one uniform number from a generator seeded with a hash of (seed, number of tokens generated
so far) and pick the token by inverse CDF: the draw depends only on the request, so the same seed gives the same
text whatever else is in the batch and in whichever position, and a request recomputed after preemption draws
exactly what it drew before. Unseeded rows draw from the sampler's shared generator. (One uniform per row instead of
the exponential race's one exponential per vocabulary entry: same determinism, a cumulative sum instead of V random
numbers.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from loraserve import kernels
from loraserve.sampling.grammar import apply_bitmask_
from loraserve.sampling.params import SamplingParams

@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float | None]  # raw log-softmax at the chosen token; None where the row did not ask for it
    top_logprobs: list[list[tuple[int, float]] | None]  # top-n of the raw log-softmax, where asked for


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._shared = torch.Generator().manual_seed(seed)  # for rows without a seed of their own

    def sample(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], allowed: torch.Tensor | None = None
    ) -> SamplerOutput:
        """logits `[N, V]` float32, one row per entry of `rows` -> one token per row.

        `allowed`: the step's grammar bitmask `[N, ceil(V/32)]` int32 (see `grammar.fill_bitmask`); the rows whose
        params have a grammar are masked with it, in place in `logits`.
        """
        if allowed is not None:
            apply_bitmask_(logits, allowed, [i for i, row in enumerate(rows) if row.params.grammar is not None])
        scores = apply_penalties(logits, rows)
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        chosen = torch.empty(len(rows), dtype=torch.int64, device=logits.device)
        if greedy:
            chosen[greedy] = greedy_pick(_rows(scores, greedy))
        if sampled:
            probs = warped_probs(_rows(scores, sampled), [rows[i].params for i in sampled])
            uniforms = torch.tensor([self._uniform(rows[i]) for i in sampled], dtype=torch.float64)
            chosen[sampled] = draw(probs, uniforms.to(probs.device))
        # A pass over the whole vocabulary per row (about 0.5 ms at 262k): only for rows that will report it.
        reporting = [i for i, row in enumerate(rows) if row.params.chosen_logprob or row.params.logprobs is not None]
        logprobs: list[float | None] = [None] * len(rows)
        top: list[list[tuple[int, float]] | None] = [None] * len(rows)
        if reporting:
            subset = _rows(logits, reporting)
            lse = torch.logsumexp(subset, dim=-1)
            picked = (subset.gather(1, chosen[reporting, None]).squeeze(1) - lse).tolist()
            for j, i in enumerate(reporting):
                logprobs[i] = picked[j]
            wanted = [j for j, i in enumerate(reporting) if rows[i].params.logprobs is not None]
            counts = [min(rows[reporting[j]].params.logprobs, subset.shape[1]) for j in wanted]
            if wanted and max(counts):
                values, ids = subset[wanted].topk(max(counts), dim=-1)
                values, ids = (values - lse[wanted, None]).tolist(), ids.tolist()
            for k, (j, count) in enumerate(zip(wanted, counts)):
                top[reporting[j]] = list(zip(ids[k][:count], values[k][:count])) if count else []
        return SamplerOutput(chosen.tolist(), logprobs, top)

    def _uniform(self, row: SamplingRow) -> float:
        seed = row.params.seed
        if seed is None:
            return torch.rand((), generator=self._shared, dtype=torch.float64).item()
        generator = torch.Generator().manual_seed(step_seed(seed, len(row.output_token_ids)))
        return torch.rand((), generator=generator, dtype=torch.float64).item()


def step_seed(seed: int, step: int) -> int:
    """The generator seed of a seeded request's `step`-th draw: a hash, so no two (seed, step) pairs share a stream."""
    key = (seed % 2**64).to_bytes(8, "little") + step.to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def greedy_pick(scores: torch.Tensor) -> torch.Tensor:
    """Each row's first index of its maximum (a NaN counting as the maximum), as `max(dim=-1).indices` gives it: by
    the compiled op on the CPU, which reads the row once at memory speed, else by `max` (several times faster than
    `argmax` over a 262k vocabulary on the CPU, and the same on CUDA)."""
    op = kernels.compiled_op("argmax_rows")
    if op is not None and scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.is_contiguous():
        return op(scores)
    return scores.max(dim=-1).indices


def _rows(tensor: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """`tensor[indices]` without the copy when the indices are all rows in order."""
    return tensor if indices == list(range(tensor.shape[0])) else tensor[indices]


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Penalized logits `[N, V]`; returns `logits` itself (no copy) when no row has a penalty.

    Repetition (HF's `RepetitionPenaltyLogitsProcessor`, TGI): every token seen in the prompt or the output, once,
    has a positive logit divided by the penalty and a negative one multiplied by it. Then frequency and presence
    (OpenAI): over output tokens only, `logit -= frequency * count + presence * (count > 0)`.

    Only the (row, token) entries that occur are read and written, gathered for the whole batch at once: the cost
    grows with the number of context tokens, not with rows x vocabulary.
    """
    repeat = [i for i, r in enumerate(rows) if (r.params.repetition_penalty or 1.0) != 1.0]
    additive = [i for i, r in enumerate(rows) if r.params.frequency_penalty or r.params.presence_penalty]
    if not repeat and not additive:
        return logits
    logits = logits.clone()
    if repeat:
        contexts = [chain(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in repeat]
        row, token, _ = occurrences(repeat, contexts, logits)
        penalty = _per_row([r.params.repetition_penalty or 1.0 for r in rows], logits)[row]
        values = logits[row, token]
        logits[row, token] = torch.where(values > 0, values / penalty, values * penalty)
    if additive:
        row, token, count = occurrences(additive, [rows[i].output_token_ids for i in additive], logits)
        frequency = _per_row([r.params.frequency_penalty or 0.0 for r in rows], logits)[row]
        presence = _per_row([r.params.presence_penalty or 0.0 for r in rows], logits)[row]
        logits[row, token] -= frequency * count.to(logits.dtype) + presence
    return logits


def occurrences(
    batch_rows: Sequence[int], token_lists: Sequence[Iterable[int]], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (batch row, token) pairs of the lists (list j belongs to batch row `batch_rows[j]`) with their counts.

    Ids outside the logits' vocabulary (a tokenizer larger than the model's head) are ignored.
    """
    lists = [list(tokens) for tokens in token_lists]
    vocab = like.shape[1]
    flat = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.int64, device=like.device)
    row = torch.repeat_interleave(torch.tensor(list(batch_rows), dtype=torch.int64, device=like.device),
                                  torch.tensor([len(tokens) for tokens in lists], device=like.device))
    inside = (flat >= 0) & (flat < vocab)
    keys, counts = torch.unique(row[inside] * vocab + flat[inside], return_counts=True)
    return keys // vocab, keys % vocab, counts


def _per_row(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def warped_probs(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, typical-p and min-p (in that order, as in HF), batched -> probabilities `[n, V]`."""
    temperatures = torch.tensor([p.temperature if p.temperature is not None else 1.0 for p in params],
                                dtype=scores.dtype, device=scores.device)
    scores = scores / temperatures[:, None]
    top_k = [(i, p.top_k) for i, p in enumerate(params) if p.top_k is not None and p.top_k > 0]
    if top_k:
        rows = [i for i, _ in top_k]
        ks = torch.tensor([min(k, scores.shape[1]) for _, k in top_k], device=scores.device)
        kth = scores[rows].topk(int(ks.max()), dim=-1).values.gather(1, (ks - 1)[:, None])
        scores[rows] = scores[rows].masked_fill(scores[rows] < kth, float("-inf"))
    top_p = [(i, p.top_p) for i, p in enumerate(params) if p.top_p is not None and p.top_p < 1.0]
    if top_p:
        rows = [i for i, _ in top_p]
        limits = torch.tensor([p for _, p in top_p], dtype=scores.dtype, device=scores.device)
        scores[rows] = _nucleus(scores[rows], limits)
    typical = [(i, p.typical_p) for i, p in enumerate(params) if p.typical_p is not None and p.typical_p < 1.0]
    if typical:
        rows = [i for i, _ in typical]
        masses = torch.tensor([p for _, p in typical], dtype=scores.dtype, device=scores.device)
        scores[rows] = _typical(scores[rows], masses)
    probs = torch.softmax(scores, dim=-1)
    min_p = [(i, p.min_p) for i, p in enumerate(params) if p.min_p is not None and p.min_p > 0]
    if min_p:
        rows = [i for i, _ in min_p]
        ratios = torch.tensor([p for _, p in min_p], dtype=probs.dtype, device=probs.device)
        kept = probs[rows]
        kept = kept.masked_fill(kept < ratios[:, None] * kept.max(dim=-1, keepdim=True).values, 0.0)
        probs[rows] = kept / kept.sum(dim=-1, keepdim=True)
    return probs


def _nucleus(scores: torch.Tensor, limits: torch.Tensor, candidates: int = 1024) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `limits` (at least one token).

    Sorting a 262k vocabulary costs tens of milliseconds a row, so the nucleus is first looked for among the top
    `candidates` tokens (their exact probabilities come from the full log-sum-exp); only rows whose nucleus is wider
    than that are sorted whole.
    """
    k = min(candidates, scores.shape[1])
    top_scores, top_ids = scores.topk(k, dim=-1)
    top_probs = (top_scores - torch.logsumexp(scores, dim=-1, keepdim=True)).exp()
    mass_before = top_probs.cumsum(dim=-1) - top_probs
    covered = mass_before[:, -1] + top_probs[:, -1] >= limits
    keep = mass_before < limits[:, None]
    kept_top = top_scores.masked_fill(~keep, float("-inf"))
    kept_scores = torch.full_like(scores, float("-inf")).scatter(1, top_ids, kept_top)
    if covered.all():
        return kept_scores
    wide = (~covered).nonzero().squeeze(1)
    sorted_scores, order = scores[wide].sort(dim=-1, descending=True)
    sorted_probs = sorted_scores.softmax(dim=-1)
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= limits[wide, None]
    kept_scores[wide] = scores[wide].scatter(1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return kept_scores


def _typical(scores: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): keep the tokens whose surprise is closest to the entropy, up to
    the mass."""
    log_probs = scores.log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).nan_to_num().sum(dim=-1, keepdim=True)
    distance = (entropy + log_probs).abs().nan_to_num(nan=float("inf"))
    order = distance.argsort(dim=-1)
    mass_before = probs.gather(1, order).cumsum(dim=-1) - probs.gather(1, order)
    drop = mass_before >= masses[:, None]
    drop[:, 0] = False
    return scores.scatter(1, order, scores.gather(1, order).masked_fill(drop, float("-inf")))


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform in [0, 1) per row picks the token whose cumulative mass first exceeds it.

    A token of probability 0 is never picked: its cumulative mass equals its predecessor's, and the target is kept
    strictly below the total so rounding cannot land on a zero-probability tail.
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    targets = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def prompt_logprobs(logits: torch.Tensor, target_ids: Sequence[int], top_n: int) -> list[tuple[int, float, list]]:
    """For logits `[P, V]` where row j predicts `target_ids[j]`: (token, its raw logprob, top-n alternatives).

    For a whole prompt `ids`, pass the logits of positions 0..len(ids)-2 and `ids[1:]`: each prompt token's logprob
    given its prefix; the first prompt token has none (the caller reports it as null). Taking the targets shifted by
    the caller lets a chunked prefill report each chunk's share.
    """
    logprobs = logits.log_softmax(dim=-1)
    targets = torch.tensor(list(target_ids), dtype=torch.int64, device=logits.device)
    chosen = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
    alternatives: list[list] = [[] for _ in target_ids]
    if top_n:
        values, ids = logprobs.topk(min(top_n, logprobs.shape[1]), dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [(t, lp, alt) for t, lp, alt in zip(target_ids, chosen, alternatives)]
