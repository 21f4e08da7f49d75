"""Quantized weights (weight-only; the lm_head also with per-token int8 activations): pure functions over tensors,
applied to `Linear` layers at load.

Imports nothing of loraserve but `errors`, so the formats can be tested and benchmarked alone.
"""

from loraserve.quant.formats import FORMATS, QuantizedWeight, quantize

__all__ = ["FORMATS", "QuantizedWeight", "quantize"]
