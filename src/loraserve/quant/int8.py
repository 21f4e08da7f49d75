"""int8 weights, one symmetric scale per output channel: weight-only (`Int8Weight`) or with int8 activations
(`Int8DynamicWeight`, for the lm_head).

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


def dynamic_kernel_applies(device: torch.device) -> bool:
    """oneDNN's int8 GEMM: CPU builds with oneDNN (every x86 build of torch)."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.onednn, "qlinear_pointwise"))


class Int8DynamicWeight:
    """`Int8Weight`'s codes times activations quantized to int8 per token at run time, on oneDNN's int8 GEMM.

    Why, for the lm_head: torch's weight-only kernel converts each weight to bf16 and, for Gemma 3 270M's 262k x 640
    head at one row, reads its 168 MB at 10.8 GB/s (15.5 ms), no faster than the packed bf16 matmul reads 335 MB
    (16.3 ms); above `KERNEL_MAX_ROWS` it dequantizes. The int8 x int8 GEMM takes 7.8 ms at one row and 36 ms at 32
    (weight-only: 169 ms). One scale per token (absmax / 127) keeps each row's own resolution: the default model's
    perplexity is 25.97 with this head, 26.00 with the weight-only int8 head, 26.19 with one scale per step.
    """

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int]) -> None:
        self.packed = packed  # oneDNN's layout of the int8 codes, `[K, N]`
        self.scales = scales  # `[N]` float32: the bf16 scales of `Int8Weight`, widened for the kernel
        self.out_features, self.in_features = shape
        self._zero_points = torch.zeros(self.out_features, dtype=torch.int64)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8DynamicWeight:
        int8 = Int8Weight.quantize(weight)
        return cls(torch.ops.onednn.qlinear_prepack(int8.codes, None), int8.scales.float(), tuple(int8.codes.shape))

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the GEMM applies, read back through it: a one-hot row quantizes exactly (1 -> 127 / 127)."""
        return self.matmul(torch.eye(self.in_features)).t().to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ w.T` in x's dtype; x is `[..., K]`, quantized to int8 row by row."""
        flat = x.reshape(-1, self.in_features).float()
        token_scales = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        codes = (torch.round(flat / token_scales) + 128).to(torch.uint8)  # oneDNN takes uint8 with a zero point
        y = torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, self.packed, self.scales, self._zero_points, None,
                                               1.0, 0, torch.float32, "none", [], "")
        return (y * token_scales).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
