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


# Shrink factors of each group's [min, max] tried; the one with the least squared error wins. Clipping a few outliers
# buys a finer grid for the rest: on Gemma 3 270M (group 32) perplexity 32.5 -> 31.3, relative MSE 0.0062 -> 0.0055.
_CLIP_STEPS = tuple(1 - 0.04 * i for i in range(12))
_CHUNK_ROWS = 4096  # rows searched at a time: bounds the fp32 temporaries for large weights


def int4_codes(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight `[N, K]` -> codes `[N, K]` uint8 in 0..15, scales and zeros `[N, K/group]` bf16."""
    parts = [_group_codes(rows, group) for rows in weight.detach().float().split(_CHUNK_ROWS)]
    return tuple(torch.cat(tensors) for tensors in zip(*parts))  # type: ignore[return-value]


def _group_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = w.shape
    w = w.reshape(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    best: tuple[torch.Tensor, ...] = ()
    for shrink in _CLIP_STEPS:
        scales = ((high - low) * shrink / 15).clamp(min=1e-10).to(torch.bfloat16)
        zeros = (low * shrink + 8 * scales.float()).to(torch.bfloat16)
        # codes against the bf16-rounded scale and zero, which are what the kernel applies
        origin = (zeros.float() - 8 * scales.float())[..., None]
        codes = torch.round((w - origin) / scales.float()[..., None]).clamp(0, 15)
        error = (codes * scales.float()[..., None] + origin - w).square().sum(dim=-1)
        if not best:
            best = (error, codes, scales, zeros)
            continue
        better = error < best[0]
        best = (torch.where(better, error, best[0]), torch.where(better[..., None], codes, best[1]),
                torch.where(better, scales, best[2]), torch.where(better, zeros, best[3]))
    _, codes, scales, zeros = best
    return codes.to(torch.uint8).reshape(n, k), scales, zeros


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
        n, k = weight.shape
        if k % group or k % 2:
            raise ValueError(f"int4 needs in_features ({k}) divisible by the group size ({group})")
        codes, scales, zeros = int4_codes(weight, group)
        scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
        nibbles = codes[:, 0::2] | (codes[:, 1::2] << 4)
        if not kernel_applies(n, k, group, weight.device):
            return cls(nibbles.contiguous(), scales_and_zeros, group, (n, k), packed_for_kernel=False)
        if weight.device.type == "cpu":
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
