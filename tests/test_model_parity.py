"""Our models' fp32 logits against transformers' for every family, through the paged KV cache.

Three prompts of different lengths run as one flat batch: a first chunk of each, then the rest (chunked prefill), then
three decode steps with all sequences together. After every step, each sequence's last-token logits must equal
transformers' logits at that position of the full sequence: relative error max|ours - ref| / max|ref| <= 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import ARCHITECTURES, save_tiny_model, tiny_config
from transformers import AutoModelForCausalLM

from loraserve.engine.input_batch import SequenceChunk, build_step_inputs
from loraserve.engine.kv_cache import allocate_kv_cache
from loraserve.layers.context import forward_context
from loraserve.models.loader import load_model

BLOCK = 4
PROMPTS = [list(range(3, 20)), list(range(40, 47)), list(range(100, 124))]
FIRST_CHUNK = [5, 7, 9]  # tokens of each prompt in the first step (the second prompt completes in one step)
TOLERANCE = 1e-4


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_logits_match_transformers_through_chunked_prefill_and_decode(architecture: str, tmp_path: Path) -> None:
    model_dir = save_tiny_model(tiny_config(architecture), tmp_path)
    ours = load_model(model_dir, torch.float32, torch.device("cpu"))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    allocate_kv_cache(ours.attention_layers(), 64, BLOCK, torch.float32, torch.device("cpu"))
    tables = [list(range(i * 16, (i + 1) * 16)) for i in range(len(PROMPTS))]
    sequences = [list(p) for p in PROMPTS]
    computed = [0] * len(PROMPTS)
    plan = [FIRST_CHUNK, [len(p) - n for p, n in zip(PROMPTS, FIRST_CHUNK)], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    for step, counts in enumerate(plan):
        active = [i for i, n in enumerate(counts) if n > 0]
        chunks = [SequenceChunk(sequences[i][computed[i] : computed[i] + counts[i]], computed[i], tables[i])
                  for i in active]
        inputs = build_step_inputs(chunks, BLOCK, torch.device("cpu"))
        with torch.inference_mode(), forward_context(inputs.context):
            logits = ours.compute_logits(ours(inputs.input_ids, inputs.positions)[inputs.last_token_index])
        for row, i in enumerate(active):
            computed[i] += counts[i]
            with torch.inference_mode():
                expected = ref(torch.tensor([sequences[i][: computed[i]]])).logits[0, -1].float()
            error = relative_error(logits[row], expected)
            assert error <= TOLERANCE, f"{architecture} step {step} sequence {i}: relative error {error:.2e}"
            if computed[i] == len(sequences[i]):  # prompt done: decode continues with the reference's greedy token
                sequences[i].append(int(expected.argmax()))
