"""The batched sampler: each warper against its definition and against transformers' warpers, penalties against HF
and the OpenAI formula, per-request seeds independent of the batch, draws that follow the distribution, raw logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from loraserve import kernels
from loraserve.errors import InvalidRequest
from loraserve.sampling.params import SamplingParams
from loraserve.sampling.sampler import (
    Sampler,
    SamplingRow,
    _nucleus,
    apply_penalties,
    draw,
    greedy_pick,
    prompt_logprobs,
    warped_probs,
)

VOCAB = 300


def rows_for(params: list[SamplingParams], outputs: list[list[int]] | None = None) -> list[SamplingRow]:
    outputs = outputs or [[] for _ in params]
    return [SamplingRow(p, [1, 2, 3], o) for p, o in zip(params, outputs)]


# -- warpers against their definitions (plain Python over a sorted list, no shared code with the sampler) ----------


def kept(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0).flatten().tolist())


def softmax_list(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def smallest_prefix_reaching(order: list[int], probs: list[float], mass: float) -> set[int]:
    """The first tokens of `order` up to and including the one that brings the running total to `mass`."""
    chosen, total = set(), 0.0
    for token in order:
        chosen.add(token)
        total += probs[token]
        if total >= mass:
            break
    return chosen


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(11)
    return torch.randn(VOCAB) * 2.5  # distinct values, so no ties at any cut


def test_temperature_divides_the_logits(logits: torch.Tensor) -> None:
    for temperature in (0.3, 1.0, 1.7):
        probs = warped_probs(logits[None], [SamplingParams(temperature=temperature)])[0]
        expected = softmax_list([v / temperature for v in logits.tolist()])
        assert probs.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("k", [1, 5, 50, VOCAB, VOCAB + 10])
def test_top_k_keeps_the_k_most_likely_tokens_renormalized(logits: torch.Tensor, k: int) -> None:
    probs = warped_probs(logits[None], [SamplingParams(top_k=k)])[0]
    order = sorted(range(VOCAB), key=lambda t: -logits[t].item())
    assert kept(probs) == set(order[: min(k, VOCAB)])
    full = softmax_list(logits.tolist())
    norm = sum(full[t] for t in order[:k])
    assert [probs[t].item() for t in order[:k]] == pytest.approx([full[t] / norm for t in order[:k]], rel=1e-5)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.75, 0.95, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_the_mass(logits: torch.Tensor, top_p: float) -> None:
    probs = warped_probs(logits[None], [SamplingParams(top_p=top_p)])[0]
    full = softmax_list(logits.tolist())
    order = sorted(range(VOCAB), key=lambda t: -full[t])
    expected = smallest_prefix_reaching(order, full, top_p)
    assert kept(probs) == expected
    assert sum(full[t] for t in expected) >= top_p - 1e-6
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_keeps_tokens_at_least_min_p_times_the_top_probability(logits: torch.Tensor, min_p: float) -> None:
    probs = warped_probs(logits[None], [SamplingParams(min_p=min_p)])[0]
    full = softmax_list(logits.tolist())
    assert kept(probs) == {t for t in range(VOCAB) if full[t] >= min_p * max(full)}


@pytest.mark.parametrize("typical_p", [0.2, 0.6, 0.9])
def test_typical_p_keeps_tokens_closest_to_the_entropy_up_to_the_mass(logits: torch.Tensor, typical_p: float) -> None:
    """Meister et al.: rank tokens by |-log p - H|, keep the smallest such prefix whose mass reaches typical_p."""
    probs = warped_probs(logits[None], [SamplingParams(typical_p=typical_p)])[0]
    full = softmax_list(logits.tolist())
    entropy = -sum(p * math.log(p) for p in full)
    order = sorted(range(VOCAB), key=lambda t: abs(-math.log(full[t]) - entropy))
    assert kept(probs) == smallest_prefix_reaching(order, full, typical_p)


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """HF's warpers in HF's order (temperature, top-k, top-p, typical, min-p), one row."""
    scores = logits[None].clone()
    warpers = [TemperatureLogitsWarper(params.temperature or 1.0)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.typical_p is not None and params.typical_p < 1:
        warpers.append(TypicalLogitsWarper(params.typical_p))
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warper in warpers:
        scores = warper(None, scores)
    return scores.softmax(-1)[0]


MIXED = [
    SamplingParams(temperature=0.7),
    SamplingParams(top_k=7),
    SamplingParams(top_p=0.8, temperature=1.3),
    SamplingParams(typical_p=0.6),
    SamplingParams(min_p=0.05),
    SamplingParams(top_k=40, top_p=0.9, temperature=0.9),
    SamplingParams(top_k=20, min_p=0.1, typical_p=0.95, temperature=1.2),
    SamplingParams(do_sample=True),
]


def test_warpers_match_transformers_row_by_row_in_one_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(len(MIXED), VOCAB) * 3
    before = logits.clone()
    ours = warped_probs(logits, MIXED)
    assert torch.equal(logits, before), "the input logits must not be modified"
    for row, params in enumerate(MIXED):
        torch.testing.assert_close(ours[row], reference_probs(logits[row], params), rtol=1e-5, atol=1e-6)


def test_nucleus_found_inside_and_outside_the_candidate_window_matches_transformers() -> None:
    torch.manual_seed(6)
    logits = torch.randn(4, VOCAB) * 0.5  # flat rows: a 0.9 nucleus holds far more than 8 tokens
    limits = [0.9, 0.5, 0.99, 0.02]
    ours = _nucleus(logits.clone(), torch.tensor(limits), candidates=8)
    for row, limit in enumerate(limits):
        expected = TopPLogitsWarper(limit)(None, logits[row : row + 1].clone())[0]
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected)), limit
    assert torch.isfinite(ours[3]).sum() <= 8 < torch.isfinite(ours[0]).sum()


# -- penalties --------------------------------------------------------------------------------------------------


def test_repetition_penalty_matches_transformers_and_additive_penalties_follow_openai() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, VOCAB) * 2
    prompt = [1, 2, 3, 2]
    outputs = [[5, 5, 9], [7, 7, 7, 8], [], [4, 4, 6]]
    params = [
        SamplingParams(repetition_penalty=1.4),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.7, frequency_penalty=-0.3, presence_penalty=1.5),
    ]
    rows = [SamplingRow(p, prompt, o) for p, o in zip(params, outputs)]
    before = logits.clone()
    ours = apply_penalties(logits, rows)
    assert torch.equal(logits, before), "the input logits must not be modified"
    # HF: over the whole context (prompt + output), each distinct token once
    expected = RepetitionPenaltyLogitsProcessor(1.4)(torch.tensor([prompt + outputs[0]]), logits[:1].clone())[0]
    torch.testing.assert_close(ours[0], expected)
    # OpenAI: logit -= count * frequency + (count > 0) * presence, over output tokens only (prompt tokens untouched)
    expected = logits[1].clone()
    expected[7] -= 3 * 0.5 + 0.25
    expected[8] -= 1 * 0.5 + 0.25
    torch.testing.assert_close(ours[1], expected)
    torch.testing.assert_close(ours[2], logits[2])
    # both kinds: repetition first, then the additive penalties
    expected = RepetitionPenaltyLogitsProcessor(0.7)(torch.tensor([prompt + outputs[3]]), logits[3:4].clone())[0]
    expected[4] -= 2 * -0.3 + 1.5
    expected[6] -= 1 * -0.3 + 1.5
    torch.testing.assert_close(ours[3], expected)


def test_penalties_ignore_token_ids_outside_the_vocabulary_and_return_the_input_when_unused() -> None:
    logits = torch.randn(1, VOCAB)
    assert apply_penalties(logits, rows_for([SamplingParams()])) is logits
    row = SamplingRow(SamplingParams(repetition_penalty=2.0, presence_penalty=1.0), [VOCAB + 5], [3, VOCAB + 1])
    ours = apply_penalties(logits, [row])
    changed = torch.nonzero(ours[0] != logits[0]).flatten().tolist()
    assert changed == [3]


def test_greedy_takes_the_argmax_of_the_penalized_logits() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 11] = 5.0, 4.0
    row = SamplingRow(SamplingParams(repetition_penalty=2.0), [10], [])  # 5 / 2 < 4
    assert Sampler().sample(logits, [row]).token_ids == [11]
    row = SamplingRow(SamplingParams(frequency_penalty=0.6), [], [10, 10])  # 5 - 1.2 < 4
    assert Sampler().sample(logits, [row]).token_ids == [11]


# -- greedy, logprobs -------------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(logprobs=3),
              SamplingParams(repetition_penalty=1.0, logprobs=1)]
    out = Sampler().sample(logits, rows_for(params))
    assert out.token_ids == logits.argmax(-1).tolist()
    raw = logits.log_softmax(-1)
    assert out.logprobs == pytest.approx(raw.gather(1, logits.argmax(-1)[:, None]).squeeze(1).tolist(), abs=1e-5)
    values, ids = raw[2].topk(3)
    assert [t for t, _ in out.top_logprobs[2]] == ids.tolist()
    assert [v for _, v in out.top_logprobs[2]] == pytest.approx(values.tolist(), abs=1e-5)
    assert out.top_logprobs[0] is None and len(out.top_logprobs[3]) == 1


def test_logprobs_of_sampled_and_penalized_rows_are_still_the_raw_model_logprobs() -> None:
    torch.manual_seed(7)
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(temperature=0.5, top_k=5, seed=1, logprobs=2),
              SamplingParams(repetition_penalty=3.0, logprobs=0),
              SamplingParams(chosen_logprob=False)]
    out = Sampler().sample(logits, rows_for(params, [[4, 5], [int(logits[1].argmax())], []]))
    raw = logits.log_softmax(-1)
    for row in range(2):
        assert out.logprobs[row] == pytest.approx(raw[row, out.token_ids[row]].item(), abs=1e-5)
    assert [t for t, _ in out.top_logprobs[0]] == raw[0].topk(2).indices.tolist()
    assert out.top_logprobs[1] == []  # logprobs=0: the chosen token only, no alternatives
    assert out.logprobs[2] is None and out.top_logprobs[2] is None


def test_top_k_one_is_greedy_even_when_sampling() -> None:
    torch.manual_seed(4)
    logits = torch.randn(8, VOCAB)
    out = Sampler().sample(logits, rows_for([SamplingParams(top_k=1, temperature=2.0)] * 8))
    assert out.token_ids == logits.argmax(-1).tolist()


# -- per-request seeds --------------------------------------------------------------------------------------------


def generate(sampler: Sampler, steps: list[torch.Tensor], params: SamplingParams, position: int, crowd: int) -> list:
    """Run one seeded row through `steps` logits, at `position` in a batch of `crowd` other (unseeded/seeded) rows."""
    output: list[int] = []
    others = [SamplingParams(temperature=1.0), SamplingParams(top_k=5), SamplingParams(seed=999, top_p=0.5),
              SamplingParams()]
    for target in steps:
        noise = torch.randn(crowd, VOCAB)
        batch = torch.cat([noise[:position], target[None], noise[position:]])
        rows = [SamplingRow(others[i % len(others)], [1], list(range(i))) for i in range(crowd)]
        rows.insert(position, SamplingRow(params, [1, 2], list(output)))
        output.append(sampler.sample(batch, rows).token_ids[position])
    return output


def test_seeded_rows_do_not_depend_on_the_batch_or_the_sampler() -> None:
    torch.manual_seed(3)
    steps = [torch.randn(VOCAB) for _ in range(25)]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=123)
    alone = generate(Sampler(seed=0), steps, seeded, position=0, crowd=0)
    assert len(set(alone)) > 5  # really sampled, not a constant
    for sampler_seed, position, crowd in [(1, 0, 3), (2, 3, 3), (3, 5, 5), (4, 2, 7)]:
        assert generate(Sampler(seed=sampler_seed), steps, seeded, position, crowd) == alone
    other_seed = generate(Sampler(seed=0), steps, SamplingParams(temperature=1.0, top_p=0.95, seed=124), 0, 0)
    assert other_seed != alone


def test_a_recomputed_request_redraws_the_same_tokens() -> None:
    """After preemption the request is replayed with the same outputs so far: step t draws what it drew before."""
    torch.manual_seed(8)
    logits = torch.randn(1, VOCAB)
    params = SamplingParams(do_sample=True, seed=2**64 - 1)
    first = [Sampler(seed=1).sample(logits, [SamplingRow(params, [1], [0] * t)]).token_ids[0] for t in range(10)]
    again = [Sampler(seed=2).sample(logits, [SamplingRow(params, [1], [5] * t)]).token_ids[0] for t in range(10)]
    assert first == again and len(set(first)) > 1


# -- distributions ------------------------------------------------------------------------------------------------

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def frequencies(tokens: list[int], size: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=size).double() / len(tokens)


def test_unseeded_draws_follow_the_distribution() -> None:
    """20,000 draws from a fixed 4-way distribution; each frequency within 0.015 of its probability (more than 4
    standard deviations of a binomial proportion at n = 20,000: sd <= sqrt(0.25 / 20000) = 0.0035)."""
    n = 20_000
    tokens = Sampler(seed=5).sample(PROBS.log().repeat(n, 1), rows_for([SamplingParams(do_sample=True)] * n)).token_ids
    assert (frequencies(tokens, 4) - PROBS).abs().max().item() < 0.015


def test_seeded_draws_across_seeds_follow_the_distribution() -> None:
    """One draw for each of 5,000 seeds (and steps); bound 0.03 is more than 4 sd at n = 5,000 (sd <= 0.0071)."""
    n = 5_000
    rows = [SamplingRow(SamplingParams(do_sample=True, seed=s), [], [0] * (s % 7)) for s in range(n)]
    tokens = Sampler().sample(PROBS.log().repeat(n, 1), rows).token_ids
    assert (frequencies(tokens, 4) - PROBS).abs().max().item() < 0.03


def test_warped_draws_follow_the_warped_distribution() -> None:
    """top_k=2 at temperature 0.5 over PROBS: p ~ PROBS^2 on the first two tokens -> 25/34 and 9/34; never the rest.
    Same 4-sd bound as above at n = 10,000 (0.02)."""
    n = 10_000
    tokens = Sampler(seed=6).sample(PROBS.log().repeat(n, 1), rows_for([SamplingParams(top_k=2, temperature=0.5)] * n))
    expected = torch.tensor([25 / 34, 9 / 34, 0.0, 0.0], dtype=torch.float64)
    observed = frequencies(tokens.token_ids, 4)
    assert observed[2:].sum().item() == 0
    assert (observed - expected).abs().max().item() < 0.02


def test_draw_never_picks_a_zero_probability_token() -> None:
    """The extreme uniforms land on the first and last tokens with mass; 1.0 (outside [0, 1)) stands for a product
    u * total that rounds up to the total."""
    probs = torch.tensor([[0.0, 0.4, 0.0, 0.6, 0.0, 0.0]]).repeat(3, 1)
    uniforms = torch.tensor([0.0, 1.0 - 2**-53, 1.0], dtype=torch.float64)
    assert draw(probs, uniforms).tolist() == [1, 3, 3]


# -- prompt logprobs ----------------------------------------------------------------------------------------------


def test_prompt_logprobs_give_each_prompt_token_given_its_prefix() -> None:
    torch.manual_seed(5)
    prompt = [7, 4, 9, 2]
    logits = torch.randn(len(prompt), VOCAB)  # position p predicts token p + 1; the last predicts the first output
    entries = prompt_logprobs(logits[:-1], prompt[1:], top_n=2)
    raw = logits.log_softmax(-1)
    assert [e[0] for e in entries] == prompt[1:]
    assert [e[1] for e in entries] == pytest.approx([raw[p, prompt[p + 1]].item() for p in range(3)], abs=1e-6)
    assert [i for i, _ in entries[1][2]] == raw[1].topk(2).indices.tolist()
    assert all(e[2] == [] for e in prompt_logprobs(logits[:-1], prompt[1:], top_n=0))


# -- parameters ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params,field",
    [
        (SamplingParams(max_new_tokens=0), "max_new_tokens"),
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(top_p=0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(typical_p=0), "typical_p"),
        (SamplingParams(min_p=1.5), "min_p"),
        (SamplingParams(repetition_penalty=0), "repetition_penalty"),
        (SamplingParams(repetition_penalty=float("inf")), "repetition_penalty"),
        (SamplingParams(frequency_penalty=3), "frequency_penalty"),
        (SamplingParams(presence_penalty=-2.5), "presence_penalty"),
        (SamplingParams(seed=-1), "seed"),
        (SamplingParams(seed=2**64), "seed"),
        (SamplingParams(stop=[""]), "stop"),
        (SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
        (SamplingParams(logprobs=50), "logprobs"),
        (SamplingParams(prompt_logprobs=-1), "prompt_logprobs"),
    ],
)
def test_validation_names_the_field(params: SamplingParams, field: str) -> None:
    with pytest.raises(InvalidRequest, match=field):
        params.validate()


def test_neutral_and_boundary_values_are_valid() -> None:
    SamplingParams().validate()
    SamplingParams(temperature=0, top_k=-1, top_p=1.0, typical_p=1.0, min_p=0.0, repetition_penalty=1.0,
                   frequency_penalty=2, presence_penalty=-2, seed=2**64 - 1, logprobs=20, prompt_logprobs=0,
                   stop=["a", "bc"], stop_token_ids=[0]).validate()


def test_greedy_rule_follows_lorax() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(do_sample=True).greedy
    assert not SamplingParams(temperature=0.5).greedy and not SamplingParams(top_p=0.9).greedy
    assert not SamplingParams(top_k=5).greedy and not SamplingParams(typical_p=0.5).greedy
    assert not SamplingParams(min_p=0.1).greedy
    assert SamplingParams(temperature=0, do_sample=True).greedy  # OpenAI: temperature 0 is greedy
    assert SamplingParams(temperature=1.0, top_p=1.0, typical_p=1.0, top_k=0).greedy  # neutral values
    assert SamplingParams(top_k=-1).greedy
    assert SamplingParams(repetition_penalty=1.2, frequency_penalty=1.0).greedy  # penalties are not warpers


def greedy_cases() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    cases = [torch.randn(rows, vocab, generator=generator)
             for rows, vocab in [(1, 1), (3, 7), (2, 16), (5, 17), (2, 65536), (1, 65537), (3, 262144)]]
    tricky = torch.randn(6, 70000, generator=generator)
    tricky[0, 90] = tricky[0, 500] = float("nan")  # the first NaN wins
    tricky[1, -1] = float("nan")  # a NaN in the scalar tail, after the vector lanes
    tricky[2, 3] = tricky[2, 69999] = 100.0  # a tie across blocks and lanes: the first index
    tricky[3] = float("-inf")
    tricky[4] = 0.0  # every column ties
    tricky[5, 65536 + 9] = 50.0  # the maximum in the second block
    return [*cases, tricky]


@pytest.mark.parametrize("scores", greedy_cases(), ids=lambda t: "x".join(map(str, t.shape)))
def test_greedy_pick_is_the_first_index_of_each_rows_maximum(scores: torch.Tensor) -> None:
    assert torch.equal(greedy_pick(scores), scores.max(dim=-1).indices)


@pytest.mark.skipif(kernels.extension() is None, reason="compiled CPU ops unavailable here")
def test_greedy_pick_runs_the_compiled_op_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    op = kernels.compiled_op("argmax_rows")
    monkeypatch.setitem(kernels._ops, "argmax_rows", lambda scores: calls.append(scores.shape) or op(scores))
    scores = torch.randn(4, 1000)
    assert torch.equal(greedy_pick(scores), scores.max(dim=-1).indices)
    greedy_pick(scores[:, ::2])  # not contiguous: torch's max
    assert calls == [(4, 1000)]
