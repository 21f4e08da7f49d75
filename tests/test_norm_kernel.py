"""loraserve's compiled RMSNorm and rotary ops (`kernels/csrc/norm_cpu.cpp`) against the torch forms they replace.

Rotary rounds every product and sum as torch does, so it must match bit for bit. RMSNorm sums the squares in another
order than torch, so its mean may differ by a rounding step: fp32 outputs agree to 2^-20 relative, and a bf16 output
moves by a step on a tiny fraction of elements (at most 1 in 1000 here). Gemma's form multiplies in fp32 and rounds
once, so it is at most one step off; Llama's rounds the normed value and then the product, so at most two.
"""

from __future__ import annotations

import pytest
import torch

from loraserve import kernels
from loraserve.layers.norm import RMSNorm
from loraserve.layers.rotary import apply_rotary, reference_apply_rotary

pytestmark = pytest.mark.skipif(kernels.extension() is None, reason="compiled CPU ops not built here")

DTYPES = [torch.bfloat16, torch.float32]
DIMS = [1, 7, 17, 33, 256, 640, 1000]  # odd and not multiples of 16 too
ROWS = [1, 3, 32, 300]


def bf16_step(v: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at each element of `v`."""
    _, exponent = torch.frexp(v.float().abs().clamp_min(2.0**-126))
    return torch.ldexp(torch.ones_like(v, dtype=torch.float32), exponent - 8)


def assert_close(got: torch.Tensor, expected: torch.Tensor, steps: int = 1) -> None:
    """Within `steps` bf16 steps of the torch form (bf16), or a few fp32 rounding steps (fp32), on rare elements."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    diff = (got.float() - expected.float()).abs()
    if got.dtype == torch.float32:
        assert (diff <= 2.0**-20 * expected.abs() + 1e-30).all()
    else:
        assert (diff <= steps * bf16_step(expected)).all()
        assert (got != expected).sum().item() <= max(1, got.numel() // 1000)


def make_norm(dim: int, offset: float, dtype: torch.dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6, offset=offset)
    norm.weight.data = (torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.5).to(dtype)
    return norm


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_matches_the_torch_form(offset: float, dim: int, rows: int, dtype: torch.dtype) -> None:
    norm = make_norm(dim, offset, dtype, seed=dim)
    x = (torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype)
    got = norm(x)
    assert kernels.compiled_op("rms_norm") is not None and got.dtype == dtype
    assert_close(got, norm.reference(x), steps=1 if offset else 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_per_head_and_empty(dtype: torch.dtype) -> None:
    norm = make_norm(256, 1.0, dtype, seed=0)
    q = torch.randn(5, 4, 256, generator=torch.Generator().manual_seed(1)).to(dtype)  # Gemma 3's q_norm over heads
    assert_close(norm(q), norm.reference(q))
    assert norm(q[:0]).shape == (0, 4, 256)


@pytest.mark.parametrize(("x_dtype", "w_dtype"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_gemma_norm_with_a_weight_in_another_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    norm = make_norm(640, 1.0, w_dtype, seed=0)
    x = torch.randn(9, 640, generator=torch.Generator().manual_seed(2)).to(x_dtype)
    got = norm(x)
    assert got.dtype == x_dtype
    assert_close(got, norm.reference(x))


def test_norm_falls_back_where_the_op_does_not_apply() -> None:
    norm = make_norm(40, 0.0, torch.float32, seed=0)
    x = torch.randn(3, 40, dtype=torch.bfloat16)
    assert torch.equal(norm(x), norm.reference(x))  # an fp32 Llama weight promotes a bf16 x: torch's rule
    assert norm(x).dtype == torch.float32
    wide = torch.randn(3, 80)
    assert torch.equal(norm(wide[:, ::2]), norm.reference(wide[:, ::2]))  # not contiguous
    assert torch.equal(norm(x.half()), norm.reference(x.half()))  # fp16: not a dtype of the op


def rope(tokens: int, rotary_dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.randint(0, 8192, (tokens,), generator=torch.Generator().manual_seed(seed)).float()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("shape", [(1, 4, 256, 256), (1, 1, 256, 256), (5, 3, 64, 32), (7, 2, 34, 34),
                                   (33, 8, 128, 96), (300, 4, 256, 256), (2, 1, 18, 6)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_is_the_torch_form_bit_for_bit(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    tokens, heads, head_dim, rotary_dim = shape
    generator = torch.Generator().manual_seed(head_dim)
    x = (torch.randn(tokens, heads, head_dim, generator=generator) * 2).to(dtype)
    cos, sin = rope(tokens, rotary_dim, dtype, seed=tokens)
    before = x.clone()
    got = apply_rotary(x, cos, sin)
    assert kernels.compiled_op("rotary") is not None
    assert torch.equal(got, reference_apply_rotary(x, cos, sin))
    assert torch.equal(x, before)
    # heads sliced out of a wider row, as a fused qkv projection leaves them
    wide = torch.randn(tokens, heads * head_dim + 24, generator=generator).to(dtype)
    strided = wide[:, 8 : 8 + heads * head_dim].view(tokens, heads, head_dim)
    assert torch.equal(apply_rotary(strided, cos, sin), reference_apply_rotary(strided, cos, sin))


def test_rotary_falls_back_for_mixed_dtypes() -> None:
    x = torch.randn(3, 2, 16, dtype=torch.bfloat16)
    cos, sin = rope(3, 16, torch.float32, seed=0)
    assert torch.equal(apply_rotary(x, cos, sin), reference_apply_rotary(x, cos, sin))
