"""Rotary position embeddings, with every scaling scheme transformers knows (linear, dynamic, yarn, longrope, llama3).

The inverse frequencies come from transformers' own `ROPE_INIT_FUNCTIONS`, so a checkpoint's `rope_parameters`
mean exactly what they mean to the reference implementation; only the application to a flat batch is ours. On the
CPU that is one compiled op (`torch.ops.loraserve.rotary`, `kernels/csrc/norm_cpu.cpp`), bit for bit the torch form,
which runs elsewhere or where the extension cannot be built.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loraserve import kernels


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> dict:
    """The rope parameter dict of `config`, for one layer type where the model keeps several (Gemma 3)."""
    params = config.rope_parameters
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    return params


class RotaryEmbedding(nn.Module):
    """Computes `cos, sin` for a flat vector of positions; shared by all layers of one layer type."""

    def __init__(self, config: PretrainedConfig, head_dim: int, layer_type: str | None = None) -> None:
        super().__init__()
        params = rope_parameters(config, layer_type)
        rope_type = params.get("rope_type", "default")
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        if rope_type == "default":
            exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
            inv_freq, self.attention_scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
        else:
            kwargs = {"layer_type": layer_type} if layer_type is not None else {}
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[T]` int64 -> cos, sin `[T, rotary_dim]` in `dtype` (computed in fp32, as the reference does)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[T, heads, head_dim]` in the rotate-half layout of HF checkpoints; dims past rotary_dim pass through.
    Returns a new tensor; `x` is left as it is."""
    op = kernels.compiled_op("rotary")
    if (op is not None and x.device.type == "cpu" and x.dtype in kernels.OP_DTYPES and x.dim() == 3
            and x.stride(-1) == 1 and cos.dtype == x.dtype and sin.dtype == x.dtype
            and cos.is_contiguous() and sin.is_contiguous()):
        return op(x, cos, sin)
    return reference_apply_rotary(x, cos, sin)


def reference_apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The torch form (any device): the definition the compiled op matches."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotate_half = torch.cat((-rotated[..., half:], rotated[..., :half]), dim=-1)
    rotated = rotated * cos[:, None, :] + rotate_half * sin[:, None, :]
    return torch.cat((rotated, passed), dim=-1) if passed.numel() else rotated
