"""oneDNN-packed bf16 weights give the tokens and logits of plain `F.linear`, and release plain copies.

Bit-identical on CPUs with native bf16 (AVX512_BF16 or AMX), where both run the same oneDNN kernel. Without it the
packed and plain paths emulate bf16 products differently and sum in another order: on an Ice Lake-class Xeon
(AVX-512 without bf16) logprobs moved by up to 0.015 on this tiny model, tokens stayed equal.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model, tiny_config

from loraserve import kernels
from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.layers.linear import Linear, cpu_packing_applies
from loraserve.sampling.params import SamplingParams

NATIVE_BF16 = any(flag in Path("/proc/cpuinfo").read_text().split() for flag in ("avx512_bf16", "amx_bf16")) \
    if Path("/proc/cpuinfo").exists() else False
EMULATED_BF16_LOGPROB_TOLERANCE = 0.05

pytestmark = pytest.mark.skipif(
    not cpu_packing_applies(torch.bfloat16, torch.device("cpu")), reason="this CPU's oneDNN has no bf16 support"
)


@pytest.mark.parametrize("architecture", ["gemma3", "phi3"])
def test_packed_generation_is_identical(architecture: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(architecture)
    config.tie_word_embeddings = architecture == "gemma3"
    model_dir = save_tiny_model(config, tmp_path)
    prompts = ["The quick brown fox", "Paris is the capital", "def add(a, b):"]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=2)

    packed = LLM(EngineConfig(model_id=str(model_dir), dtype="bfloat16", device="cpu"))
    model = packed.engine.core.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert all(m.packed_weight is not None for m in linears)
    # the plain copies stay where the embedding shares one or the GEMV streams them at a row or two
    gemv = kernels.compiled_op("bf16_linear") is not None
    assert (model.lm_head.weight is not None) == (config.tie_word_embeddings or gemv)
    assert all((m.weight is not None) == gemv for m in linears if m is not model.lm_head)

    monkeypatch.setattr("loraserve.engine.loading.cpu_packing_applies", lambda dtype, device: False)
    plain = LLM(EngineConfig(model_id=str(model_dir), dtype="bfloat16", device="cpu"))
    assert plain.engine.core.runner.model.lm_head.packed_weight is None
    for a, b in zip(packed.generate(prompts, params), plain.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        if NATIVE_BF16:
            assert [t.logprob for t in a.tokens] == [t.logprob for t in b.tokens]
        else:
            assert [t.logprob for t in a.tokens] == pytest.approx([t.logprob for t in b.tokens],
                                                                   abs=EMULATED_BF16_LOGPROB_TOLERANCE)
