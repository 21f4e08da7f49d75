"""The fused batched-LoRA CPU op (`layers.lora_kernel`) against its reference loop.

Tolerances. fp32: |got - want| <= 1e-5 x the magnitude of the terms (|y| + (|x| @ |A|.T) @ |B|), i.e. 1e-5 relative
where nothing cancels. bf16: the oracle is the exact-as-fp32 sum from the same bf16 inputs, unrounded; the op rounds
once, so |got - want| <= 2^-8 |want| (half a bf16 ulp) plus the fp32 slack above.

The first run compiles the op into the loraserve cache (about 15 s); later runs load it.
"""

from __future__ import annotations

import logging

import pytest
import torch

from loraserve import kernels
from loraserve.layers import lora_kernel

DTYPES = [torch.float32, torch.bfloat16]

needs_op = pytest.mark.skipif(not lora_kernel.fused_lora_available("cpu"),
                              reason=f"fused op not built here ({lora_kernel.fused_lora_info()})")


def make_case(tokens: int, inn: int, out: int, ranks: list[int], per_segment: list[int], dtype: torch.dtype,
              seed: int = 0, gap: int = 2):
    """Segments with `ranks` and `per_segment` tokens each (tokens shuffled, leftovers use no adapter), arena rows
    placed with `gap` unused rows between adapters."""
    g = torch.Generator().manual_seed(seed)
    assert sum(per_segment) <= tokens
    offsets, row = [], gap
    for r in ranks:
        offsets.append(row)
        row += r + gap
    cap = row
    a = torch.randn(cap, inn, generator=g).to(dtype)
    b = (torch.randn(cap, out, generator=g) / 4).to(dtype)
    x = torch.randn(tokens, inn, generator=g).to(dtype)
    y = torch.randn(tokens, out, generator=g).to(dtype)
    perm = torch.randperm(tokens, generator=g)
    rows = perm[: sum(per_segment)].contiguous()
    starts = torch.tensor([0] + torch.tensor(per_segment).cumsum(0).tolist(), dtype=torch.int64)
    return y, x, a, b, rows, starts, torch.tensor(offsets, dtype=torch.int64), torch.tensor(ranks, dtype=torch.int64)


def oracle(y, x, a, b, rows, starts, offsets, ranks):
    """fp32 `want` (unrounded) and the magnitude of its terms, from the same (possibly bf16) inputs."""
    want, mag = y.double().clone(), y.double().abs()
    for s, (off, r) in enumerate(zip(offsets.tolist(), ranks.tolist())):
        idx = rows[starts[s] : starts[s + 1]]
        if r == 0 or idx.numel() == 0:
            continue
        xa, aa, bb = x[idx].double(), a[off : off + r].double(), b[off : off + r].double()
        want[idx] += (xa @ aa.T) @ bb
        mag[idx] += (xa.abs() @ aa.abs().T) @ bb.abs()
    return want, mag


def assert_close(got: torch.Tensor, case) -> None:
    want, mag = oracle(*case)
    err = (got.double() - want).abs()
    bound = 1e-5 * mag
    if got.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * want.abs()
    assert torch.isfinite(got).all()
    worst = (err - bound).max().item()
    assert worst <= 0, f"exceeds the bound by {worst:g} (max err {err.max().item():g})"


def run_both(case):
    y = case[0]
    got = lora_kernel.add_lora_(y.clone(), *case[1:])
    ref = lora_kernel.reference_add_lora_(y.clone(), *case[1:])
    return got, ref


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 8, 16, 32, 64, 128])
def test_ranks(rank, dtype):
    case = make_case(24, 96, 80, [rank, rank, rank], [1, 5, 9], dtype, seed=rank)
    got, ref = run_both(case)
    assert_close(got, case)
    assert_close(ref, case)  # the oracle's own loop meets the same bound


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (15, 17), (640, 1024), (2048, 640), (33, 2049)])
def test_odd_shapes_mixed_ranks(shape, dtype):
    inn, out = shape
    ranks = [1, 16, 0, 7, 128, 3, 0, 64]
    per = [1, 3, 2, 1, 6, 4, 1, 5]
    case = make_case(30, inn, out, ranks, per, dtype, seed=inn)
    got, _ = run_both(case)
    assert_close(got, case)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per", [1, 2, 3, 4, 5, 8, 13, 32])
def test_tokens_per_adapter(per, dtype):
    """One token per adapter (decode) up to many (prefill), covering every token-block remainder."""
    case = make_case(32 * per, 72, 136, [16] * 4 + [8] * 4, [per] * 8, dtype, seed=per)
    got, _ = run_both(case)
    assert_close(got, case)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_shapes_many_adapters(dtype):
    """Gemma 3 270M's gate projection, 32 adapters of rank 16, one token each: the parallel path."""
    case = make_case(40, 640, 2048, [16] * 32, [1] * 32, dtype)
    got, _ = run_both(case)
    assert_close(got, case)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
def test_untouched_rows_and_skipped_segments(dtype):
    """Tokens outside `rows` and tokens of rank-0 or empty segments keep their bits."""
    case = make_case(20, 48, 40, [8, 0, 4, 16], [3, 4, 0, 2], dtype)
    y, _, _, _, rows, starts, _, _ = case
    got, _ = run_both(case)
    changed = set(rows[0:3].tolist()) | set(rows[7:9].tolist())
    for t in range(y.shape[0]):
        if t not in changed:
            assert torch.equal(got[t], y[t]), t
    assert_close(got, case)
    empty = lora_kernel.add_lora_(y.clone(), *case[1:4], rows[:0], torch.zeros(1, dtype=torch.int64),
                                  case[6][:0], case[7][:0])
    assert torch.equal(empty, y)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_other_adapters_never_leak(poison, dtype):
    """inf/nan in other adapters' arena rows, in the free rows right next to a segment, and in x's and y's columns
    past `in`/`out` (views of wider tensors) never reach a row: the result is finite and equal, bit for bit, to the
    same call without them."""
    inn, out = 37, 53
    y, x, a, b, rows, starts, offsets, ranks = make_case(16, inn, out, [4, 16, 5, 9], [2, 5, 1, 3], dtype, gap=1)
    clean = lora_kernel.add_lora_(y.clone(), x, a, b, rows, starts, offsets, ranks)
    a2, b2 = a.clone(), b.clone()
    used = torch.zeros(a.shape[0], dtype=torch.bool)
    for off, r in zip(offsets.tolist(), ranks.tolist()):
        used[off : off + r] = True
    a2[~used], b2[~used] = poison, poison  # the gaps: right before and after every adapter
    # a fifth adapter, poisoned through and through, resident but used by no token of this call
    a2 = torch.cat([a2, torch.full((8, inn), poison, dtype=dtype)])
    b2 = torch.cat([b2, torch.full((8, out), poison, dtype=dtype)])
    xw = torch.full((x.shape[0], inn + 19), poison, dtype=dtype)
    xw[:, :inn] = x
    yw = torch.full((y.shape[0], out + 11), poison, dtype=dtype)
    yw[:, :out] = y
    got = lora_kernel.add_lora_(yw[:, :out], xw[:, :inn], a2, b2, rows, starts, offsets, ranks)
    assert torch.isfinite(got).all()
    assert torch.equal(got, clean)
    past = yw[:, out:]  # left alone
    assert (past.isnan() if poison != poison else past == poison).all()

    # and the poisoned adapter in the batch: only its own tokens see it
    ranks3 = torch.cat([ranks, torch.tensor([8])])
    offsets3 = torch.cat([offsets, torch.tensor([a.shape[0]])])
    extra = [t for t in range(y.shape[0]) if t not in set(rows.tolist())][:2]
    rows3 = torch.cat([rows, torch.tensor(extra)])
    starts3 = torch.cat([starts, starts[-1:] + len(extra)])
    got3 = lora_kernel.add_lora_(y.clone(), x, a2, b2, rows3, starts3, offsets3, ranks3)
    others = [t for t in range(y.shape[0]) if t not in extra]
    assert torch.isfinite(got3[others]).all()
    assert torch.equal(got3[others], clean[others])
    assert not torch.isfinite(got3[extra]).any()


@needs_op
def test_thread_count_does_not_change_bits():
    case = make_case(64, 640, 1024, [16] * 16 + [64] * 4, [2] * 16 + [4] * 4, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lora_kernel.add_lora_(case[0].clone(), *case[1:])
        torch.set_num_threads(2)
        two = lora_kernel.add_lora_(case[0].clone(), *case[1:])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_op
def test_bad_input_is_refused():
    y, x, a, b, rows, starts, offsets, ranks = make_case(8, 16, 16, [4, 4], [2, 2], torch.float32)
    with pytest.raises(RuntimeError, match="twice"):
        lora_kernel.add_lora_(y, x, a, b, torch.tensor([0, 1, 1, 2]), starts, offsets, ranks)
    with pytest.raises(RuntimeError, match="outside the arena"):
        lora_kernel.add_lora_(y, x, a, b, rows, starts, torch.tensor([0, a.shape[0] - 2]), ranks)
    with pytest.raises(RuntimeError, match="out of range"):
        lora_kernel.add_lora_(y, x, a, b, torch.tensor([0, 1, 2, 8]), starts, offsets, ranks)
    with pytest.raises(RuntimeError, match="dtype"):
        lora_kernel.add_lora_(y, x, a.to(torch.bfloat16), b, rows, starts, offsets, ranks)


def test_forced_fallback_matches(monkeypatch):
    """With the op off (as where nothing can compile it) add_lora_ runs the torch loop, on any dtype."""
    monkeypatch.setattr(lora_kernel, "_op", False)
    assert not lora_kernel.fused_lora_available("cpu")
    for dtype in DTYPES + [torch.float16]:
        case = make_case(12, 37, 53, [3, 0, 16], [2, 3, 4], dtype)
        got = lora_kernel.add_lora_(case[0].clone(), *case[1:])
        if dtype != torch.float16:
            assert_close(got, case)
        assert torch.equal(got, lora_kernel.reference_add_lora_(case[0].clone(), *case[1:]))


def test_build_failure_falls_back_and_logs(monkeypatch, caplog):
    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(lora_kernel, "_op", None)
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_build", broken)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert not lora_kernel.fused_lora_available("cpu")
        assert not lora_kernel.fused_lora_available("cpu")  # tried once, logged once
    assert sum("no compiler here" in r.getMessage() for r in caplog.records) == 1
    assert "no compiler here" in lora_kernel.fused_lora_info()
    case = make_case(6, 16, 24, [2, 5], [1, 2], torch.float32)
    assert_close(lora_kernel.add_lora_(case[0].clone(), *case[1:]), case)


def test_env_switch_turns_the_op_off(monkeypatch):
    monkeypatch.setattr(lora_kernel, "_op", None)
    monkeypatch.setenv("LORASERVE_FUSED_LORA", "0")
    assert not lora_kernel.fused_lora_available("cpu")
    assert "LORASERVE_FUSED_LORA" in lora_kernel.fused_lora_info()


def test_not_on_cuda():
    assert not lora_kernel.fused_lora_available(torch.device("cuda"))
    assert not lora_kernel.fused_lora_available("cuda:0")
