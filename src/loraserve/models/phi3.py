"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share the architecture): the Llama block with fused projections.

`qkv_proj` and `gate_up_proj` stay single `Linear`s because Phi-3 checkpoints and PEFT adapters address them as one
module each; splitting them would make adapters for them impossible to load by name.

Rope: partial rotary (`partial_rotary_factor`, Phi-4-mini) is handled by `RotaryEmbedding`. LongRoPE needs a choice.
transformers picks the short or long factors per forward from the current sequence length (long once it exceeds
`original_max_position_embeddings`), which with a KV cache means keys cached under one set are read by queries
rotated with the other. We fix one set for the model's lifetime: the one transformers uses for a sequence of the
model's configured length, `max_position_embeddings`. So the 128k variants always use the long factors (exact
against transformers for sequences past the original length, slightly different for shorter ones) and the 4k
variants, where the two lengths are equal, always use the short factors (exact everywhere). The attention scaling
factor does not depend on the set.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loraserve.layers.attention import Attention
from loraserve.layers.linear import Linear
from loraserve.layers.rotary import RotaryEmbedding, apply_rotary
from loraserve.models.llama import CheckpointModel, DecoderLayer, DecoderModel, head_dim_of


class Phi3Attention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, config.hidden_size)
        # transformers applies Phi-3's `sliding_window` (2047 in the 4k checkpoints) to every layer.
        window = getattr(config, "sliding_window", None)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, window)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.reshape(tokens, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.reshape(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        return self.o_proj(self.attn(q.reshape(tokens, -1), k.reshape(tokens, -1), v))


class Phi3MLP(nn.Module):
    """`down(up * act(gate))` with gate and up stored as one matrix, gate first."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


def phi3_rotary(config: PretrainedConfig) -> RotaryEmbedding:
    """`RotaryEmbedding` of the config, with LongRoPE's factors fixed for the configured length (module docstring)."""
    rotary = RotaryEmbedding(config, head_dim_of(config))
    if config.rope_parameters.get("rope_type") == "longrope":
        inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](
            config, rotary.inv_freq.device, seq_len=config.max_position_embeddings
        )
        rotary.inv_freq.copy_(inv_freq)
    return rotary


class Phi3ForCausalLM(CheckpointModel):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        layers = [DecoderLayer(config, Phi3Attention(config), Phi3MLP(config)) for _ in range(config.num_hidden_layers)]
        self.model = DecoderModel(config, layers, phi3_rotary(config))
        self.tie_embeddings()
