"""What a decode step reads: the bytes of the model's weights as they are stored for the matmuls."""

from __future__ import annotations

from loraserve.engine.engine import Engine
from loraserve.layers.linear import Linear


def linear_bytes(engine: Engine) -> dict[str, int]:
    """Bytes each `Linear` holds for its matmul: quantized, oneDNN-packed or plain (a tied plain lm_head counts: it
    is the embedding's table too, but the head reads all of it every step)."""
    totals = {"decoder": 0, "lm_head": 0}
    for name, module in engine.core.runner.model.named_modules():
        if not isinstance(module, Linear):
            continue
        if module.quantized is not None:
            size = module.quantized.nbytes
        elif module.packed_weight is not None:
            size = module.packed_weight.nbytes
        else:
            size = module.weight.nbytes
        totals["lm_head" if name == "lm_head" else "decoder"] += size
    return totals
