"""int4 weight-only: asymmetric, one bf16 scale and zero per group of `group` input channels.

Values follow the tinygemm convention that torch's kernels implement: w ~= (q - 8) * scale + zero with q in 0..15.
On the CPU the codes are stored only in the layout of `_convert_weight_to_int4pack_for_cpu`, which differs between
AVX2 and AVX-512 builds and is not unpacked here; where the kernel does not apply (N not a multiple of 16, or a
device without a kernel) the codes are kept as plain nibbles and multiplied after dequantizing. The CPU kernel's
cost grows linearly with the rows of `x` (~0.035 ms per row for 2048x640 on one core), so long prefills pay for it;
without an unpacker for its layout there is no cheaper dequantized path for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# Each group starts from its [min, max] and alternates `_REFINE_STEPS` times between codes for the current scale and
# zero and the least-squares scale and zero for those codes (Lloyd's algorithm on a uniform grid; a group keeps a step
# only if it lowers the error). Relative MSE on 11 requantized layers of Gemma 3 270M (q/up/down of 4 blocks, group
# 32): min-max 0.0067, + 10 steps 0.0054 (20 steps: the same); the clip search it replaces (the best of 12 shrinks of
# [min, max]) 0.0060, or 0.0055 with 10 steps after it. Perplexities: benchmarks/RESULTS.md, "Weight-only quantization".
_REFINE_STEPS = 10
_CHUNK_ROWS = 4096  # rows quantized at a time: bounds the fp32 temporaries for large weights


def int4_codes(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight `[N, K]` -> codes `[N, K]` uint8 in 0..15, scales and zeros `[N, K/group]` bf16."""
    parts = [_group_codes(rows, group) for rows in weight.detach().float().split(_CHUNK_ROWS)]
    return tuple(torch.cat(tensors) for tensors in zip(*parts))  # type: ignore[return-value]


def _group_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    w = w.reshape(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-10).to(torch.bfloat16).float()
    best = _fit(w, scales, low + 8 * scales)
    for _ in range(_REFINE_STEPS):
        best = _keep_better(best, _fit(w, *_least_squares(w, best[1])))
    _, codes, scales, zeros = best
    return codes.to(torch.uint8).reshape(n, k), scales, zeros


def _fit(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(squared error, codes, scales, zeros) per group; codes against the bf16-rounded scale and zero, which are what
    the kernel applies (callers pass bf16-valued scales and the zeros that fit them)."""
    scales, zeros = scales.to(torch.bfloat16), zeros.to(torch.bfloat16)
    origin = (zeros.float() - 8 * scales.float())[..., None]
    codes = torch.round((w - origin) / scales.float()[..., None]).clamp(0, 15)
    error = (codes * scales.float()[..., None] + origin - w).square().sum(dim=-1)
    return error, codes, scales, zeros


def _keep_better(best: tuple[torch.Tensor, ...], new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    better = new[0] < best[0]
    return tuple(torch.where(better[..., None] if a.dim() > better.dim() else better, a, b) for a, b in zip(new, best))


def _least_squares(w: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's least-squares line w ~ (q - 8) * scale + zero for fixed codes, the scale rounded to bf16 before
    the zero is fitted to it. Codes all equal give scale ~0 and zero = the mean, judged by `_keep_better` like any
    other fit."""
    q = codes - 8
    count = w.shape[-1]
    sum_q, sum_w = q.sum(dim=-1), w.sum(dim=-1)
    det = count * q.square().sum(dim=-1) - sum_q.square()  # an integer, 0 only when the codes are all equal
    scales = (count * (q * w).sum(dim=-1) - sum_q * sum_w) / det.clamp(min=1)
    scales = scales.clamp(min=1e-10).to(torch.bfloat16).float()
    return scales, (sum_w - scales * sum_q) / count


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n, k = codes.shape
    q = codes.reshape(n, scales.shape[1], -1).to(dtype) - 8
    return (q * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]).reshape(n, k)


def kernel_applies(out_features: int, in_features: int, group: int, device: torch.device) -> bool:
    if device.type == "cpu":
        return out_features % 16 == 0 and group in (32, 64, 128, 256)
    # CUDA tinygemm (untested here): K in tiles of innerKTiles * 16
    return device.type == "cuda" and out_features % 8 == 0 and in_features % 128 == 0 and group >= 32


class Int4Weight:
    """Packed codes plus `scales_and_zeros` `[K/group, N, 2]` bf16, the layout torch's int4 kernels read."""

    def __init__(self, data: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, shape: tuple[int, int],
                 packed_for_kernel: bool) -> None:
        self.data = data  # kernel layout, or plain nibbles `[N, K/2]` uint8 (even k low, odd k high)
        self.scales_and_zeros = scales_and_zeros
        self.group = group
        self.out_features, self.in_features = shape
        self.packed_for_kernel = packed_for_kernel

    @classmethod
    def quantize(cls, weight: torch.Tensor, group: int) -> Int4Weight:
        if weight.shape[1] % group:
            raise ValueError(f"int4 needs in_features ({weight.shape[1]}) divisible by the group size ({group})")
        return cls.from_codes(*int4_codes(weight, group), group)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> Int4Weight:
        """codes `[N, K]` uint8 in 0..15, scales and zeros `[N, K/group]` of any float dtype, on the target device.

        Scales and zeros are rounded to bf16 (what the kernels read), each to within 2^-8 of itself, so a weight
        w = (q - 8) * scale + zero moves by at most 2^-8 * (8 * |scale| + |zero|).
        """
        n, k = codes.shape
        if k % group or k % 2 or scales.shape != (n, k // group) or zeros.shape != scales.shape:
            raise ValueError(f"int4 codes {tuple(codes.shape)} do not match scales {tuple(scales.shape)} and zeros "
                             f"{tuple(zeros.shape)} at group size {group}")
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).to(torch.bfloat16).transpose(0, 1).contiguous()
        if not kernel_applies(n, k, group, codes.device):
            nibbles = codes[:, 0::2] | (codes[:, 1::2] << 4)
            return cls(nibbles.contiguous(), scales_and_zeros, group, (n, k), packed_for_kernel=False)
        if codes.device.type == "cpu":
            data = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        else:
            data = torch._convert_weight_to_int4pack((codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous(), 8)
        return cls(data, scales_and_zeros, group, (n, k), packed_for_kernel=True)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales_and_zeros.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the matmul applies; from kernel-packed codes via an identity matmul, so rounded to bf16."""
        if self.packed_for_kernel:
            eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.data.device)
            return self._kernel(eye).t().to(dtype)
        codes = torch.stack([self.data & 15, self.data >> 4], dim=-1).reshape(self.out_features, self.in_features)
        scales, zeros = self.scales_and_zeros.transpose(0, 1).unbind(-1)
        return dequantize_codes(codes, scales, zeros, dtype)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.data.device.type == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x, self.data, self.group, self.scales_and_zeros)
        return torch._weight_int4pack_mm(x, self.data, self.group, self.scales_and_zeros)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ w.T` in x's dtype; x is `[..., K]`. The kernel runs in bf16."""
        flat = x.reshape(-1, self.in_features)
        if self.packed_for_kernel:
            y = self._kernel(flat.to(torch.bfloat16).contiguous()).to(x.dtype)
        else:
            y = F.linear(flat, self.dequantize(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)
