"""Gemma 1, 2 and 3 (text) fp32 logits against transformers' eager implementation, through the paged KV cache.

Each family gets a tiny random checkpoint whose prompts are longer than its sliding window, with the features that
make the family differ switched on: MQA (Gemma 1, Gemma 3 270M), alternating sliding/global layers, a
`query_pre_attn_scalar` different from head_dim, small attention and final softcaps that actually bend the logits
(Gemma 2), q/k norms and per-layer-type rope with linear scaling on the global layers only (Gemma 3).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from model_harness import batched_prefill_errors, chunked_decode_errors
from tiny_models import save_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, PretrainedConfig

from loraserve.models.base import CausalLM
from loraserve.models.loader import load_model

WINDOW = 5
# 11, 6 and 17 tokens, all longer than WINDOW; the harness splits each in half for chunked prefill.
PROMPTS = [list(range(3, 14)), list(range(40, 46)), list(range(100, 117))]
TOLERANCE = 1e-4
COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16, max_position_embeddings=256)

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "gemma": lambda: GemmaConfig(
        **COMMON, num_hidden_layers=2, num_key_value_heads=1, architectures=["GemmaForCausalLM"]
    ),
    "gemma2": lambda: Gemma2Config(
        **COMMON, num_hidden_layers=4, num_key_value_heads=2, sliding_window=WINDOW, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, architectures=["Gemma2ForCausalLM"],
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **COMMON, num_hidden_layers=6, num_key_value_heads=1, sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
        architectures=["Gemma3ForCausalLM"],
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[CausalLM, nn.Module]:
    """Ours and transformers' model, both fp32, loaded from the same saved tiny checkpoint."""
    model_dir = save_tiny_model(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))
    ours = load_model(model_dir, torch.float32, torch.device("cpu"))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return ours, ref


def assert_within_tolerance(errors: dict[str, float]) -> None:
    failing = {where: f"{error:.2e}" for where, error in errors.items() if error > TOLERANCE}
    assert not failing, f"relative error above {TOLERANCE}: {failing}"


def test_three_prompts_in_one_flat_step(models: tuple[CausalLM, nn.Module]) -> None:
    assert_within_tolerance(batched_prefill_errors(*models, PROMPTS))


def test_chunked_prefill_then_batched_decode(models: tuple[CausalLM, nn.Module]) -> None:
    assert_within_tolerance(chunked_decode_errors(*models, PROMPTS, decode_steps=3))
