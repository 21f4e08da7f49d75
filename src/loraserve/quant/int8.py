"""int8 weight-only: one symmetric scale per output channel.

CPU decode uses torch's `_weight_int8pack_mm` with bf16 activations (fp32 activations hit a path ~20x slower). Its
cost grows linearly with the rows of `x` (measured 0.036 ms/row for 2048x640), while dequantizing once costs about as
much as 17 rows; so batches above `KERNEL_MAX_ROWS` rows dequantize in chunks and use a float matmul instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNEL_MAX_ROWS = 16
_CHUNK_ROWS = 16384  # output channels dequantized at a time: bounds the transient float copy (lm_head: 262k rows)


class Int8Weight:
    """codes `[N, K]` int8 and scales `[N]` bf16; w ~= codes * scales[:, None]."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes = codes
        self.scales = scales
        self.out_features, self.in_features = codes.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        # in row chunks: the fp32 temporaries of a whole lm_head would add ~1 GB to the peak at load
        parts = [cls._quantize_rows(rows.float()) for rows in weight.detach().split(_CHUNK_ROWS)]
        return cls(torch.cat([codes for codes, _ in parts]), torch.cat([scales for _, scales in parts]))

    @staticmethod
    def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the bf16-rounded scale is the one the kernel applies, so codes are computed against it
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(torch.bfloat16)
        codes = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return codes, scales

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.codes.to(dtype) * self.scales.to(dtype)[:, None]

    def uses_kernel(self, rows: int) -> bool:
        # the CPU kernel crashes (no error) when K is not a multiple of 16
        return self.codes.device.type == "cpu" and self.in_features % 16 == 0 and rows <= KERNEL_MAX_ROWS

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ w.T` in x's dtype; x is `[..., K]`."""
        flat = x.reshape(-1, self.in_features)
        if self.uses_kernel(flat.shape[0]):
            y = torch._weight_int8pack_mm(flat.to(torch.bfloat16).contiguous(), self.codes, self.scales).to(x.dtype)
        else:
            y = torch.cat([F.linear(flat, codes.to(x.dtype)) * scales.to(x.dtype) for codes, scales in
                           zip(self.codes.split(_CHUNK_ROWS), self.scales.split(_CHUNK_ROWS))], dim=-1)
        return y.reshape(*x.shape[:-1], self.out_features)
