"""The Llama decoder and its close relatives: Llama 1/2/3.x, Mistral, Qwen2/2.5 and Qwen3.

They share one block (pre-norm attention with rotary embeddings and GQA, pre-norm gated MLP); the differences are
config switches, each following transformers' modeling code for the family:

- projection biases: Llama's `attention_bias` (q/k/v/o) and `mlp_bias`; Qwen2 always biases q/k/v and never o;
  Qwen3 follows `attention_bias`;
- Qwen3 RMS-normalizes q and k per head before the rotation, with an explicit `head_dim`;
- sliding windows: Mistral applies `sliding_window` to every layer; Qwen2/3 only to the layers `layer_types` marks
  `sliding_attention` (their configs clear `sliding_window` unless `use_sliding_window`); Llama never windows;
- rope scaling of every kind, which `RotaryEmbedding` takes from the config.

Module names follow the checkpoints, so `load_weights` is a dictionary lookup and PEFT target names address the
`Linear`s directly. `CheckpointModel`, `DecoderLayer` and `DecoderModel` are shared with the Phi-3 and Gemma files.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from loraserve.errors import ModelLoadError
from loraserve.layers.attention import Attention
from loraserve.layers.embedding import VocabEmbedding
from loraserve.layers.linear import Linear, ProjectionGroup
from loraserve.layers.norm import RMSNorm
from loraserve.layers.rotary import RotaryEmbedding, apply_rotary


def head_dim_of(config: PretrainedConfig) -> int:
    """An explicit `head_dim` (Qwen3, Mistral Nemo, Gemma) or hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: PretrainedConfig, layer_idx: int) -> int | None:
    """Per-layer window where the config lists layer types (Qwen2/3, Gemma 2/3), else one window for all layers."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return config.sliding_window if layer_types[layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def _llama_family_window(config: PretrainedConfig, layer_idx: int) -> int | None:
    """The window transformers applies to this layer: Mistral's ignores `layer_types` and Llama's has none."""
    if config.model_type in ("qwen2", "qwen3"):
        return sliding_window_of(config, layer_idx)
    if config.model_type == "mistral":
        return getattr(config, "sliding_window", None)
    return None


class SeparateQKVAttention(nn.Module):
    """Attention with separate q/k/v projections, computed as one group, and optional per-head q/k norms;
    subclasses build the modules (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `attn`, and `q_norm`/`k_norm` when
    `qk_norm`), then call `group_qkv`."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool
    qkv: ProjectionGroup

    def group_qkv(self) -> None:
        self.qkv = ProjectionGroup(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(x)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q.reshape(tokens, -1), k.reshape(tokens, -1), v))


class LlamaAttention(SeparateQKVAttention):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        if config.model_type == "qwen2":  # hard-coded in Qwen2's modeling code; its config has no switch
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(getattr(config, "attention_bias", False))
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            _llama_family_window(config, layer_idx),
        )
        self.group_qkv()



class LlamaMLP(nn.Module):
    """`down(act(gate(x)) * up(x))`; three separate projections, as the checkpoints store them."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.gate_up = ProjectionGroup(self.gate_proj, self.up_proj)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block; `self_attn` and `mlp` are the family's own modules."""

    def __init__(self, config: PretrainedConfig, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embedding, the layer stack and the final norm; named `model` in checkpoints.

    cos/sin are computed once per forward and shared by all layers. A family whose rope differs from what
    `RotaryEmbedding` derives from the config alone (Phi-3's longrope) passes its own `rotary`.
    """

    def __init__(
        self, config: PretrainedConfig, layers: list[nn.Module], rotary: RotaryEmbedding | None = None
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = rotary if rotary is not None else RotaryEmbedding(config, head_dim_of(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class CheckpointModel(nn.Module):
    """What every family shares: the lm_head, logits, the attention list and loading by checkpoint name."""

    model: nn.Module

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def tie_embeddings(self) -> None:
        """Share the embedding table with the lm_head where the config says so (called once `model` exists)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(hidden).float() if out is None else self.lm_head.forward_into(hidden, out)

    def attention_layers(self) -> list[Attention]:
        return [module for module in self.modules() if isinstance(module, Attention)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each checkpoint tensor into the parameter of the same name, casting to the model's dtype.

        Tensors the model computes itself (rotary `inv_freq`) or shares (a tied `lm_head.weight`) are skipped;
        any other unknown name, a shape mismatch or a parameter left unfilled raises `ModelLoadError`.
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        tied = self.config.tie_word_embeddings
        missing = {name for name in params if not (tied and name == "lm_head.weight")}
        with torch.no_grad():
            for name, tensor in weights:
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue
                param = params.get(name)
                if param is None:
                    raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                if param.shape != tensor.shape:
                    raise ModelLoadError(
                        f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}"
                    )
                param.copy_(tensor)
                missing.discard(name)
        if missing:
            names = sorted(missing)
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise ModelLoadError(f"checkpoint lacks tensor(s) {', '.join(names[:5])}{more}")


class LlamaForCausalLM(CheckpointModel):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        layers = [
            DecoderLayer(config, LlamaAttention(config, i), LlamaMLP(config)) for i in range(config.num_hidden_layers)
        ]
        self.model = DecoderModel(config, layers)
        self.tie_embeddings()
