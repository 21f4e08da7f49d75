"""The projection every model file uses for the weights LoRA can target and quantization can replace.

Model code only ever builds `Linear`; what a weight is stored as (float now, packed int8/int4 later) and whether a
per-token adapter delta is added on top are decided outside the model, by swapping `weight_format` or attaching
`lora`. Module names equal checkpoint names, so PEFT's `target_modules` address these layers directly.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class LoRADelta(Protocol):
    """What the adapter runtime attaches to a layer: adds the batched delta for the current step's adapters."""

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class Linear(nn.Module):
    """`y = x W^T (+ b)`, with an optional batched LoRA delta added on top."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora: LoRADelta | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora is not None:
            y = self.lora.add_delta(x, y)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
