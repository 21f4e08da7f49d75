"""int8 weights, one symmetric scale per output channel: in torch's layout for its own kernels (`Int8Weight`), or in
the layout of loraserve's int8 CPU op, weight-only or with int8 activations (`Int8BlockedWeight`).

`Int8Weight` serves where loraserve's op does not run: torch's `_weight_int8pack_mm` with bf16 activations (fp32
activations hit a far slower path), whose cost grows linearly with the rows of `x`, so batches above
`KERNEL_MAX_ROWS` rows dequantize in chunks and use a float matmul instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraserve import kernels

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


class Int8BlockedWeight:
    """int8 codes in the layout of loraserve's int8 CPU ops (`kernels/csrc/int8_cpu.cpp`), times float activations
    (weight-only int8) or times activations quantized to int8 per token at run time ("w8a8").

    The layout is `[N/16, K4, 16, 4]`: 16 output channels by 4 input channels per 64 bytes, what AVX512_VNNI
    multiplies and what fp32 FMAs widen a byte of at a time. A row of the weight is a strided view of it, so `lookup`
    serves a tied embedding table from the same bytes as the lm_head: a quantized model holds its 262k-row table
    once, in int8. w8a8 gives each token row one scale (absmax / 127), which keeps each row's own resolution. Where
    the op does not run (not built, no AVX-512 / VNNI, not the CPU) a torch form computes the same product in fp32
    from dequantized chunks.
    """

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor, compensation: torch.Tensor | None,
                 shape: tuple[int, int]) -> None:
        self.blocks = blocks  # `[N/16, K4, 16, 4]` int8, N and K zero-padded
        self.scales = scales  # `[N/16 * 16]` float32: the bf16 scales of `Int8Weight`, widened for the kernel
        # w8a8 only: `[N/16 * 16]` int32, 128 * each channel's code sum (the op's activations are unsigned)
        self.compensation = compensation
        self.out_features, self.in_features = shape

    @property
    def int8_activations(self) -> bool:
        return self.compensation is not None

    @classmethod
    def quantize(cls, weight: torch.Tensor, int8_activations: bool) -> Int8BlockedWeight:
        int8 = Int8Weight.quantize(weight)
        return cls.from_codes(int8.codes, int8.scales, int8_activations)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, int8_activations: bool) -> Int8BlockedWeight:
        """codes `[N, K]` int8 and scales `[N]`, re-laid out for the kernel (padding rows and columns with zeros)."""
        n, k = codes.shape
        padded = F.pad(codes, (0, -k % 4, 0, -n % 16))
        groups, k4 = padded.shape[0] // 16, padded.shape[1] // 4
        blocks = padded.view(groups, 16, k4, 4).transpose(1, 2).contiguous()
        compensation = padded.sum(dim=1, dtype=torch.int32) * 128 if int8_activations else None
        return cls(blocks, F.pad(scales.float(), (0, -n % 16)), compensation, (n, k))

    @property
    def nbytes(self) -> int:
        extra = self.compensation.nbytes if self.compensation is not None else 0
        return self.blocks.nbytes + self.scales.nbytes + extra

    def _codes(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The int8 codes of output channels `rows` (indices, or a slice of whole 16-channel groups), `[len, K]`."""
        if isinstance(rows, slice):
            part = self.blocks[rows].transpose(1, 2)
        else:
            part = self.blocks[rows // 16, :, rows % 16]
        return part.reshape(-1, self.blocks.shape[1] * 4)[:, : self.in_features]

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight, as an embedding table: `[*ids.shape, K]` in `dtype`."""
        flat = ids.reshape(-1)
        rows = self._codes(flat).float() * self.scales[flat][:, None]
        return rows.to(dtype).reshape(*ids.shape, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.lookup(torch.arange(self.out_features, device=self.blocks.device), dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ w.T` in x's dtype; x is `[..., K]` (under w8a8 quantized to int8 row by row)."""
        flat = x.reshape(-1, self.in_features)
        if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.bfloat16) and \
                int8_op_runs(self.int8_activations):
            flat = flat.contiguous()
            if self.compensation is not None:
                y = torch.ops.loraserve.int8_linear(flat, self.blocks, self.scales, self.compensation)
            else:
                y = torch.ops.loraserve.int8_weight_linear(flat, self.blocks, self.scales)
        else:
            y = self._matmul_torch(flat)
        return y[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)

    def _matmul_torch(self, flat: torch.Tensor) -> torch.Tensor:
        """The op's product in fp32 from dequantized groups of channels: the fallback and the tests' reference."""
        x = flat.float()
        if self.int8_activations:
            token_scales = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            x = torch.round(x / token_scales).clamp(-127, 127)
        step = max(1, _CHUNK_ROWS // 16)
        y = torch.cat([F.linear(x, self._codes(slice(g, g + step)).float()) * self.scales[g * 16 : (g + step) * 16]
                       for g in range(0, self.blocks.shape[0], step)], dim=-1)
        return (y * token_scales if self.int8_activations else y).to(flat.dtype)


def int8_op_runs(int8_activations: bool) -> bool:
    """Whether loraserve's int8 CPU op is built here with vector kernels for this form: AVX512_VNNI for int8
    activations, AVX-512 for float ones (their scalar forms are slower than torch's)."""
    module = kernels.extension()
    isa = module.int8_isa() if module is not None else "unavailable"
    return isa == "avx512_vnni" if int8_activations else isa.startswith("avx512")
