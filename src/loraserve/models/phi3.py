"""Phi-3: the Llama block with fused projections, kept fused as in the checkpoint.

`qkv_proj` and `gate_up_proj` are single `Linear`s because Phi-3 checkpoints and PEFT adapters address them as one
module each; splitting them would make adapters for them impossible to load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from loraserve.layers.attention import Attention
from loraserve.layers.linear import Linear
from loraserve.layers.rotary import apply_rotary
from loraserve.models.llama import CheckpointModel, DecoderLayer, DecoderModel, head_dim_of, sliding_window_of


class Phi3Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(self.q_size, config.hidden_size)
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, sliding_window_of(config, layer_idx)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        return self.o_proj(self.attn(q.reshape(tokens, -1), k.reshape(tokens, -1), v))


class Phi3MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Phi3ForCausalLM(CheckpointModel):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        layers = [
            DecoderLayer(config, Phi3Attention(config, i), Phi3MLP(config)) for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers)
        self.tie_embeddings()
