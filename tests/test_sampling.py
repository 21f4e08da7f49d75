"""The batched sampler against transformers' logits processors and warpers, used as an independent reference."""

from __future__ import annotations

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

from loraserve.errors import InvalidRequest
from loraserve.sampling.params import SamplingParams
from loraserve.sampling.sampler import Sampler, SamplingRow, _nucleus, apply_penalties, prompt_logprobs, warped_probs

VOCAB = 300


def rows_for(params: list[SamplingParams], outputs: list[list[int]] | None = None) -> list[SamplingRow]:
    outputs = outputs or [[] for _ in params]
    return [SamplingRow(p, [1, 2, 3], o) for p, o in zip(params, outputs)]


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
    SamplingParams(do_sample=True),
]


def test_warpers_match_transformers_row_by_row_in_one_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(len(MIXED), VOCAB) * 3
    ours = warped_probs(logits.clone(), MIXED)
    for row, params in enumerate(MIXED):
        torch.testing.assert_close(ours[row], reference_probs(logits[row], params), rtol=1e-5, atol=1e-6)


def test_repetition_penalty_matches_transformers_and_additive_penalties_follow_openai() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB) * 2
    outputs = [[5, 5, 9], [7, 7, 7, 8], []]
    params = [
        SamplingParams(repetition_penalty=1.4),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
    ]
    rows = [SamplingRow(p, [1, 2, 3], o) for p, o in zip(params, outputs)]
    ours = apply_penalties(logits, rows)
    context = torch.tensor([[1, 2, 3, 5, 5, 9]])
    expected = RepetitionPenaltyLogitsProcessor(1.4)(context, logits[:1].clone())[0]
    torch.testing.assert_close(ours[0], expected)
    expected = logits[1].clone()
    expected[7] -= 0.5 * 3 + 0.25
    expected[8] -= 0.5 * 1 + 0.25
    torch.testing.assert_close(ours[1], expected)
    torch.testing.assert_close(ours[2], logits[2])


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


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(3)
    target = torch.randn(VOCAB)
    seeded = SamplingParams(temperature=1.0, seed=123)
    sampler = Sampler(seed=0)
    for step in range(20):
        output = list(range(step))
        alone = sampler.sample(target[None], [SamplingRow(seeded, [1], output)]).token_ids[0]
        crowd = torch.randn(5, VOCAB)
        batch = torch.cat([crowd[:3], target[None], crowd[3:]])
        rows = rows_for([SamplingParams(temperature=1.0)] * 3) + [SamplingRow(seeded, [1], output)] + rows_for(
            [SamplingParams(top_k=5)] * 2
        )
        assert Sampler(seed=step + 100).sample(batch, rows).token_ids[3] == alone


def test_draws_follow_the_distribution() -> None:
    """20,000 unseeded draws from a fixed 4-way distribution; each frequency within 0.015 of its probability
    (more than 4 standard deviations of a binomial proportion at n = 20,000)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(20_000, 1)
    tokens = Sampler(seed=5).sample(logits, rows_for([SamplingParams(do_sample=True)] * 20_000)).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=4).float() / len(tokens)
    assert (counts - probs).abs().max().item() < 0.015


def test_top_k_one_is_greedy_even_when_sampling() -> None:
    torch.manual_seed(4)
    logits = torch.randn(8, VOCAB)
    out = Sampler().sample(logits, rows_for([SamplingParams(top_k=1, temperature=2.0)] * 8))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_prompt_logprobs() -> None:
    torch.manual_seed(5)
    logits = torch.randn(3, VOCAB)
    entries = prompt_logprobs(logits, [4, 9, 2], top_n=2)
    raw = logits.log_softmax(-1)
    assert [e[0] for e in entries] == [4, 9, 2]
    assert [e[1] for e in entries] == pytest.approx([raw[0, 4].item(), raw[1, 9].item(), raw[2, 2].item()], abs=1e-6)
    assert [i for i, _ in entries[1][2]] == raw[1].topk(2).indices.tolist()


@pytest.mark.parametrize(
    "params,field",
    [
        (SamplingParams(max_new_tokens=0), "max_new_tokens"),
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_p=0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(typical_p=0), "typical_p"),
        (SamplingParams(repetition_penalty=0), "repetition_penalty"),
        (SamplingParams(frequency_penalty=3), "frequency_penalty"),
        (SamplingParams(stop=[""]), "stop"),
        (SamplingParams(logprobs=50), "logprobs"),
    ],
)
def test_validation_names_the_field(params: SamplingParams, field: str) -> None:
    with pytest.raises(InvalidRequest, match=field):
        params.validate()


def test_greedy_rule_follows_lorax() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(do_sample=True).greedy
    assert not SamplingParams(temperature=0.5).greedy and not SamplingParams(top_p=0.9).greedy
    assert SamplingParams(temperature=0, do_sample=True).greedy
    assert SamplingParams(temperature=1.0, repetition_penalty=1.2).greedy


def test_nucleus_found_inside_and_outside_the_candidate_window_matches_transformers() -> None:
    torch.manual_seed(6)
    logits = torch.randn(4, VOCAB) * 0.5  # flat rows: a 0.9 nucleus holds far more than 8 tokens
    limits = [0.9, 0.5, 0.99, 0.02]
    ours = _nucleus(logits.clone(), torch.tensor(limits), candidates=8)
    for row, limit in enumerate(limits):
        expected = TopPLogitsWarper(limit)(None, logits[row : row + 1].clone())[0]
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected)), limit
    assert torch.isfinite(ours[3]).sum() <= 8 < torch.isfinite(ours[0]).sum()
