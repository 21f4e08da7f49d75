"""loraserve's int8 CPU ops (`kernels/csrc/int8_cpu.cpp`, behind `Int8BlockedWeight`) against their torch form.

Both forms compute the same sums (w8a8: each row quantized with its own absmax scale, times the int8 codes, in
exact integers; weight-only: the float row times the codes) and differ only in fp32 rounding, so fp32 outputs agree to
1e-5 relative and bf16 outputs to one rounding step. The layout also serves embedding rows (`lookup`), checked
against the plain codes.
"""

from __future__ import annotations

import pytest
import torch

from loraserve.quant import int8 as int8_module
from loraserve.quant.int8 import Int8BlockedWeight, Int8Weight, int8_op_runs

SHAPES = [(16, 4), (48, 640), (40, 37), (1000, 100), (256, 2048), (17, 5)]  # N or K not multiples of 16 / 4 too
ROWS = [1, 5, 6, 7, 8, 9, 33]
FORMS = [pytest.param(True, id="w8a8",
                      marks=pytest.mark.skipif(not int8_op_runs(True), reason="int8 op without AVX512_VNNI here")),
         pytest.param(False, id="weight-only",
                      marks=pytest.mark.skipif(not int8_op_runs(False), reason="int8 op without AVX-512 here"))]


def case(n: int, k: int, rows: int, dtype: torch.dtype, int8_activations: bool,
         seed: int = 0) -> tuple[Int8BlockedWeight, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * 0.05
    x = torch.randn(rows, k, generator=generator) * torch.logspace(-2, 1, rows)[:, None]
    return Int8BlockedWeight.quantize(weight, int8_activations), x.to(dtype)


@pytest.mark.parametrize("int8_activations", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_matches_the_torch_form(int8_activations: bool, shape: tuple[int, int], rows: int,
                                   dtype: torch.dtype) -> None:
    weight, x = case(*shape, rows, dtype, int8_activations)
    got = weight.matmul(x)
    expected = weight._matmul_torch(x)[:, : shape[0]]
    assert got.dtype == dtype and got.shape == (rows, shape[0])
    if dtype == torch.float32:
        scale = expected.abs().amax(dim=1, keepdim=True)  # per row: rows differ in magnitude by 1000x
        assert ((got - expected).abs() <= 1e-5 * scale + 1e-30).all()
    else:  # both round an fp32 result to bf16: at most one step apart, unless the fp32 sums straddle a boundary
        step = expected.float().abs() * 2.0**-7 + 2.0**-7 * expected.float().abs().amax(dim=1, keepdim=True) * 1e-4
        assert ((got.float() - expected.float()).abs() <= step).all()


@pytest.mark.parametrize("int8_activations", FORMS)
def test_zero_rows_and_batched_input(int8_activations: bool) -> None:
    weight, x = case(64, 96, 4, torch.float32, int8_activations)
    x[1] = 0
    y = weight.matmul(x.reshape(2, 2, 96))
    assert y.shape == (2, 2, 64) and torch.equal(y[0, 1], torch.zeros(64))
    assert weight.matmul(x[:0]).shape == (0, 64)


@pytest.mark.skipif(not int8_op_runs(False), reason="int8 op not built here")
def test_ops_reject_what_they_cannot_read() -> None:
    weight, x = case(32, 64, 2, torch.float32, True)
    w8a8, weight_only = torch.ops.loraserve.int8_linear, torch.ops.loraserve.int8_weight_linear
    with pytest.raises(RuntimeError, match="columns"):
        w8a8(x[:, :32].contiguous(), weight.blocks, weight.scales, weight.compensation)
    with pytest.raises(RuntimeError, match="int8"):
        weight_only(x, weight.blocks.float(), weight.scales)
    with pytest.raises(RuntimeError, match="compensation"):
        w8a8(x, weight.blocks, weight.scales, weight.compensation[:-1])
    with pytest.raises(RuntimeError, match="scales"):
        weight_only(x, weight.blocks, weight.scales[:-1])


@pytest.mark.parametrize("int8_activations", [True, False])
def test_fallback_is_the_defining_formula(monkeypatch: pytest.MonkeyPatch, int8_activations: bool) -> None:
    """Where the op does not run, `matmul` runs the torch form: the quantized inputs times the dequantized weight."""
    monkeypatch.setattr(int8_module, "int8_op_runs", lambda int8_activations: False)
    weight, x = case(40, 37, 5, torch.float32, int8_activations)
    if int8_activations:
        scales = x.abs().amax(dim=1, keepdim=True) / 127
        x = torch.round(x / scales) * scales
    torch.testing.assert_close(weight.matmul(x), x @ weight.dequantize().T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 640), (40, 37), (17, 5)])
def test_lookup_returns_the_codes_of_each_row(shape: tuple[int, int]) -> None:
    torch.manual_seed(1)
    plain = Int8Weight.quantize(torch.randn(*shape))
    weight = Int8BlockedWeight.from_codes(plain.codes, plain.scales, int8_activations=True)
    ids = torch.tensor([[0, shape[0] - 1, 3], [5, 5, 1]])
    rows = weight.lookup(ids, torch.float32)
    assert rows.shape == (2, 3, shape[1])
    assert torch.equal(rows, plain.dequantize()[ids])
    assert torch.equal(weight.dequantize(), plain.dequantize())
