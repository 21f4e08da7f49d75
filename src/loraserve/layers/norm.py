"""RMSNorm in the two conventions found in checkpoints: `x * w` (Llama) and `x * (1 + w)` (Gemma).

On the CPU it runs as one compiled op (`torch.ops.loraserve.rms_norm`, `kernels/csrc/norm_cpu.cpp`) rather than the
chain of elementwise ops of the torch form, which dominates a decode step of a small model; elsewhere, or where the
extension cannot be built, the torch form runs. The two differ only in the order of the fp32 sum of squares.
"""

from __future__ import annotations

import torch
from torch import nn

from loraserve import kernels


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, then cast back, as the reference implementations do."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        # Gemma stores w with the 1 removed (`offset=1.0`); Llama stores it whole (`offset=0.0`).
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim), requires_grad=False)
        # ((storage, version) of the weight it was made from, offset + weight in fp32)
        self._scale: tuple[tuple[int, int], torch.Tensor] | None = None

    def _fp32_scale(self) -> torch.Tensor:
        """`offset + weight` in fp32, made once per value of the weight rather than twice per call. Keyed by the
        weight's storage and version: loading in place bumps the version, `.to()` or a new parameter moves the
        storage."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._scale is None or self._scale[0] != key:
            self._scale = (key, self.offset + self.weight.detach().float())
        return self._scale[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = kernels.compiled_op("rms_norm")
        if op is not None and x.device.type == "cpu" and x.dtype in kernels.OP_DTYPES and x.is_contiguous():
            weight = self.weight  # the op adds the offset itself, in fp32: cheaper than looking up the cached scale
            if weight.dtype == x.dtype or (self.offset and weight.dtype in kernels.OP_DTYPES):
                return op(x, weight, self.eps, self.offset)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The torch form (any device): the definition the compiled op matches."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            # Gemma multiplies in fp32 before the cast back; Llama casts first. Both orders matter for bf16 parity.
            return (normed * self._fp32_scale()).to(x.dtype)
        return self.weight * normed.to(x.dtype)
