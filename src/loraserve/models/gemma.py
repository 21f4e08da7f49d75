"""Gemma, Gemma 2 and Gemma 3 (text).

What sets them apart from Llama: RMSNorm stores `w - 1`; embeddings are scaled by sqrt(hidden), rounded to the model
dtype first as the reference does; a GeGLU MLP. Gemma 2 and 3 add norms after attention and after the MLP (four per
block), mix sliding and global attention layers (`config.layer_types`), and scale queries by `query_pre_attn_scalar`.
Gemma 2 caps attention logits with tanh; Gemma 3 instead normalizes q and k per head and gives sliding and global
layers different rope parameters. Both cap the final logits where `final_logit_softcapping` is set.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from loraserve.errors import UnsupportedModel
from loraserve.layers.attention import Attention
from loraserve.layers.embedding import VocabEmbedding
from loraserve.layers.linear import Linear, ProjectionGroup
from loraserve.layers.norm import RMSNorm
from loraserve.layers.rotary import RotaryEmbedding
from loraserve.models.llama import CheckpointModel, SeparateQKVAttention, head_dim_of, sliding_window_of

_FAMILIES = ("gemma", "gemma2", "gemma3_text")


def _norm(config: PretrainedConfig, dim: int | None = None) -> RMSNorm:
    return RMSNorm(dim or config.hidden_size, config.rms_norm_eps, offset=1.0)


class GemmaAttention(SeparateQKVAttention):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        family = config.model_type
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = config.attention_bias
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.qk_norm = family == "gemma3_text"
        if self.qk_norm:
            self.q_norm = _norm(config, self.head_dim)
            self.k_norm = _norm(config, self.head_dim)
        if family == "gemma":
            scale, window = self.head_dim**-0.5, None
        else:
            scale = config.query_pre_attn_scalar**-0.5
            window = sliding_window_of(config, layer_idx)
        # Only Gemma 2 caps attention logits; transformers' Gemma 3 ignores `attn_logit_softcapping`, so we do too.
        softcap = config.attn_logit_softcapping if family == "gemma2" else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, window, softcap)
        self.group_qkv()



class GemmaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.gate_up = ProjectionGroup(self.gate_proj, self.up_proj)
        # Gemma 1 configs name the activation `hidden_act`, Gemma 2 and 3 `hidden_activation` (as transformers reads).
        self.act = ACT2FN[config.hidden_act if config.model_type == "gemma" else config.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(self.act(gate) * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = GemmaAttention(config, layer_idx)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = _norm(config)
        self.post_attention_layernorm = _norm(config)
        # Gemma 1 uses post_attention_layernorm as the pre-MLP norm; Gemma 2/3 have two more and sandwich both halves.
        self.sandwich = config.model_type != "gemma"
        if self.sandwich:
            self.pre_feedforward_layernorm = _norm(config)
            self.post_feedforward_layernorm = _norm(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not self.sandwich:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    """Embedding, the layer stack and the final norm; named `model` in checkpoints."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config)
        # Gemma 3 keeps rope parameters per layer type (local and global bases, scaling on global layers only); one
        # RotaryEmbedding per type, evaluated once per forward, and each layer indexes its type's cos/sin.
        head_dim = head_dim_of(config)
        if config.model_type == "gemma3_text":
            types = sorted(set(config.layer_types))
            self.rotary = nn.ModuleList(RotaryEmbedding(config, head_dim, t) for t in types)
            self.rope_index = [types.index(t) for t in config.layer_types]
        else:
            self.rotary = nn.ModuleList([RotaryEmbedding(config, head_dim)])
            self.rope_index = [0] * config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # The reference multiplies by sqrt(hidden) already rounded to the model dtype (25.25, not 25.30, in bf16).
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)
        ropes = [rotary(positions, x.dtype) for rotary in self.rotary]
        for layer, rope in zip(self.layers, self.rope_index):
            x = layer(x, *ropes[rope])
        return self.norm(x)


class GemmaForCausalLM(CheckpointModel):
    """Gemma 1, 2 and 3 (text-only checkpoints); `config.model_type` selects the family's differences."""

    def __init__(self, config: PretrainedConfig) -> None:
        if config.model_type not in _FAMILIES:
            raise UnsupportedModel(f"GemmaForCausalLM handles {', '.join(_FAMILIES)}, not {config.model_type!r}")
        if getattr(config, "use_bidirectional_attention", None):
            raise UnsupportedModel("bidirectional (embedding) Gemma checkpoints are not causal LMs")
        super().__init__(config)
        self.model = GemmaModel(config)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.tie_embeddings()

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().compute_logits(hidden, out)
        if self.final_softcap is not None:  # in place, in the reference's order: divide, tanh, multiply
            logits.div_(self.final_softcap).tanh_().mul_(self.final_softcap)
        return logits
