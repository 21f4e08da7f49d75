"""The registry of weight formats: a format name -> a function turning a float weight into a quantized one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from loraserve.quant.int4 import Int4Weight
from loraserve.quant.int8 import Int8BlockedWeight, Int8Weight, int8_op_runs

logger = logging.getLogger(__name__)

# Chosen on Gemma 3 270M (benchmarks/RESULTS.md, "Weight-only quantization"): the kernel runs as fast at 32, 64 or
# 128, and group 32 loses the least perplexity (fp32 25.8; with the clip search int4.py used then: g32 31.3, g64 35.4,
# g128 38.0) for 0.31x the bf16 bytes against 0.28x at 64. It is also the kernel's smallest group, so a layer it does
# not divide falls back to int8.
INT4_GROUP = 32


class QuantizedWeight(Protocol):
    """What `Linear` holds in place of its float weight."""

    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int: ...

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ w.T`, returned in x's dtype."""
        ...

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The `[out, in]` weight the matmul applies."""
        ...


def _int4(weight: torch.Tensor, name: str = "") -> QuantizedWeight:
    """int4 at INT4_GROUP, or int8 for a layer whose in_features the group does not divide."""
    if weight.shape[1] % INT4_GROUP == 0:
        return Int4Weight.quantize(weight, INT4_GROUP)
    logger.info("int4: %s has in_features %d, not a multiple of the group size %d; quantized to int8 instead",
                name or "a layer", weight.shape[1], INT4_GROUP)
    return _int8(weight)


def _int8(weight: torch.Tensor, name: str = "") -> QuantizedWeight:
    """Weight-only int8: on loraserve's op where it runs (its layout), else on torch's kernels (theirs)."""
    if weight.device.type == "cpu" and int8_op_runs(int8_activations=False):
        return Int8BlockedWeight.quantize(weight, int8_activations=False)
    return Int8Weight.quantize(weight)


def _w8a8(weight: torch.Tensor, name: str = "") -> QuantizedWeight:
    """int8 weights and per-token int8 activations (loraserve's int8 op where it is built, else a torch form)."""
    return Int8BlockedWeight.quantize(weight, int8_activations=True)


FORMATS: dict[str, Callable[..., QuantizedWeight]] = {"int8": _int8, "int4": _int4, "w8a8": _w8a8}


def quantize(weight: torch.Tensor, fmt: str, name: str = "") -> QuantizedWeight:
    """Quantize a `[out, in]` float weight to `fmt`; `name` only labels log lines."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; known: {sorted(FORMATS)}")
    return FORMATS[fmt](weight, name)
