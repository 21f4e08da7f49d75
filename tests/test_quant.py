"""Weight-only int8/int4: kernels against the dequantized weight, models against fp32, LoRA on a quantized base.

Bounds are relative Frobenius errors of a layer's output. Measured on random N(0, 0.05) weights: the bf16 kernels
are 0.0023-0.0029 from an fp32 matmul with the dequantized weight (activation and output rounding), the fallback
paths 1e-7; against the original weight int8 is 0.005-0.007 off and int4 (group 32) 0.07-0.08.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import save_random_adapter, save_tiny_model, tiny_config

from loraserve.cli import build_parser
from loraserve.config import EngineConfig
from loraserve.engine.llm import LLM
from loraserve.engine.loading import load
from loraserve.engine.request import AdapterRef
from loraserve.layers.linear import Linear, quantize_linear_weights
from loraserve.models import gguf as gguf_loader
from loraserve.models.default_model import default_model_path
from loraserve.quant import quantize
from loraserve.quant.ggml import ggml_int4_codes, int4_from_ggml
from loraserve.quant.int4 import Int4Weight, dequantize_codes, int4_codes
from loraserve.quant.int8 import KERNEL_MAX_ROWS, Int8BlockedWeight, Int8Weight
from loraserve.sampling.params import SamplingParams

KERNEL_VS_DEQUANTIZED = 0.01
INT8_FORMS = (Int8Weight, Int8BlockedWeight)  # torch's layout, or loraserve's op's where it runs
FALLBACK_VS_DEQUANTIZED = 1e-5
VS_ORIGINAL = {"int8": 0.015, "int4": 0.15}
PROMPTS = ["The quick brown fox", "Paris is the capital of France; Berlin", "def add(a, b):",
           "Once upon a time there", '{"name": "loraserve", "adapters"', "Straße, café, naïve"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def reference_dequantized(weight: torch.Tensor, fmt: str, group: int) -> torch.Tensor:
    """The weight each format represents, from its defining formula (not from the packed storage)."""
    if fmt == "int8":
        scales = (weight.abs().amax(dim=1) / 127).to(torch.bfloat16).float()
        return torch.round(weight / scales[:, None]).clamp(-127, 127) * scales[:, None]
    return dequantize_codes(*int4_codes(weight, group))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rows", [3, 40])  # int8: kernel up to KERNEL_MAX_ROWS rows, dequantize-then-matmul above
def test_layer_matches_dequantized_and_original_weight(fmt: str, rows: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(256, 192) * 0.05
    x = torch.randn(rows, 192)
    quantized = quantize(weight, fmt)
    y = quantized.matmul(x)
    assert y.dtype == x.dtype and y.shape == (rows, 256)
    kernel = fmt == "int4" or rows <= KERNEL_MAX_ROWS
    bound = KERNEL_VS_DEQUANTIZED if kernel else FALLBACK_VS_DEQUANTIZED
    assert relative_error(y, F.linear(x, reference_dequantized(weight, fmt, 32))) < bound
    assert relative_error(y, F.linear(x, weight)) < VS_ORIGINAL[fmt]
    assert relative_error(quantized.dequantize(), reference_dequantized(weight, fmt, 32)) < 0.005
    bf16 = quantized.matmul(x.to(torch.bfloat16).reshape(1, rows, 192))  # batched input, bf16 activations
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (1, rows, 256)


@pytest.mark.parametrize("rows", [1, 40])
def test_int8_gemm_with_per_token_activations_is_exact_for_its_quantized_inputs(rows: int) -> None:
    """w8a8 computes exactly (up to float32 accumulation) the product of each row quantized with its own absmax scale
    and the int8 weight; against float the only further error is that per-token rounding."""
    torch.manual_seed(3)
    weight = torch.randn(320, 192) * 0.05
    x = torch.randn(rows, 192) * torch.logspace(-2, 1, rows)[:, None]  # rows of very different magnitudes
    quantized = quantize(weight, "w8a8")
    assert isinstance(quantized, Int8BlockedWeight) and quantized.int8_activations
    token_scales = x.abs().amax(dim=1, keepdim=True) / 127
    x_quantized = torch.round(x / token_scales) * token_scales
    int8_weight = reference_dequantized(weight, "int8", 32)
    y = quantized.matmul(x)
    assert y.dtype == x.dtype and y.shape == (rows, 320)
    assert relative_error(y, F.linear(x_quantized, int8_weight)) < 1e-5
    assert relative_error(y, F.linear(x, weight)) < VS_ORIGINAL["int8"]
    assert torch.allclose(quantized.dequantize(), int8_weight, rtol=1e-5, atol=1e-7)
    assert quantized.nbytes == 320 * 192 + 320 * 4 * 2  # codes, fp32 scales, int32 compensation
    bf16 = quantized.matmul(x.to(torch.bfloat16).reshape(1, rows, 192))
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (1, rows, 320)


@pytest.mark.parametrize(("shape", "expected"), [
    ((48, 100), "int8 plain"),  # K % 16 != 0: torch's int8 kernel would crash; int4's group does not divide 100
    ((40, 128), "int4 plain"),  # N % 16 != 0: no CPU int4 kernel, codes kept as nibbles
    ((256, 48), "int4 as int8"),  # K % 32 != 0: int4 falls back to int8 (with the int8 kernel: 48 % 16 == 0)
])
def test_odd_shapes_take_the_fallbacks(shape: tuple[int, int], expected: str) -> None:
    torch.manual_seed(1)
    weight = torch.randn(*shape) * 0.05
    x = torch.randn(3, shape[1])
    for fmt in ("int8", "int4"):
        quantized = quantize(weight, fmt)
        if fmt == "int4" and expected in ("int8 plain", "int4 as int8"):
            assert isinstance(quantized, INT8_FORMS)
        if fmt == "int4" and expected == "int4 plain":
            assert isinstance(quantized, Int4Weight) and not quantized.packed_for_kernel
        group = quantized.group if isinstance(quantized, Int4Weight) else 0
        reference = reference_dequantized(weight, "int8" if isinstance(quantized, INT8_FORMS) else "int4", group)
        assert relative_error(quantized.matmul(x), F.linear(x, reference)) < KERNEL_VS_DEQUANTIZED
        assert relative_error(quantized.matmul(x), F.linear(x, weight)) < VS_ORIGINAL["int4"]


def test_bad_formats_and_groups_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize(torch.randn(16, 32), "int3")
    with pytest.raises(ValueError, match="divisible by the group"):
        Int4Weight.quantize(torch.randn(16, 48), 32)
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        EngineConfig(quantize="fp8")


def test_cli_and_environment_set_quantize(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraserve.cli import _ENGINE_FLAGS, _pick

    args = build_parser().parse_args(["generate", "hi", "--quantize", "int4"])
    assert EngineConfig(**_pick(args, _ENGINE_FLAGS)).quantize == "int4"
    monkeypatch.setenv("QUANTIZE", "int8")
    args = build_parser().parse_args(["generate", "hi"])
    assert EngineConfig(**_pick(args, _ENGINE_FLAGS)).quantize == "int8"


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config("gemma3")
    config.tie_word_embeddings = True
    return save_tiny_model(config, tmp_path_factory.mktemp("gemma3-quant"))


def greedy(llm: LLM, new_tokens: int = 16) -> list[list[int]]:
    return [c.token_ids for c in llm.generate(PROMPTS, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions equal up to each sequence's first difference (later tokens follow other prefixes)."""
    agreed = 0
    for x, y in zip(a, b):
        for i, j in zip(x, y):
            if i != j:
                break
            agreed += 1
    return agreed / sum(len(x) for x in a)


# Measured on this tiny random Gemma 3 (seed 0, 6 prompts x 16 tokens, share of tokens before the first difference):
# int8 0.875 in float32 and bfloat16 (1.0 while the tied embedding table stayed float; the default model's perplexity
# moves by about 0.1% with it in int8); int4 0.40 in float32, 0.25 in bfloat16; plain bfloat16 without quantization
# 0.70. Random tiny models amplify weight noise (another seed: int4 0.03), so the int4 bound only catches garbage
# (chance is ~0.003 with 384 ids); the unit tests above bound its per-layer error.
@pytest.mark.parametrize(("fmt", "dtype", "bound"), [
    ("int8", "float32", 0.8), ("int4", "float32", 0.1), ("int8", "bfloat16", 0.6), ("int4", "bfloat16", 0.1)])
def test_quantized_model_agrees_with_fp32(gemma_dir: Path, fmt: str, dtype: str, bound: float) -> None:
    reference = greedy(LLM(EngineConfig(model_id=str(gemma_dir), dtype="float32", device="cpu")))
    llm = LLM(EngineConfig(model_id=str(gemma_dir), dtype=dtype, device="cpu", quantize=fmt))
    model = llm.engine.core.runner.model
    decoder = [m for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"]
    assert decoder and all(m.quantized is not None and m.weight is None for m in decoder)
    assert isinstance(model.lm_head.quantized, Int8BlockedWeight)  # w8a8 under both formats: see engine/loading.py
    embedding = model.model.embed_tokens  # the tied table is the head's codes, held once
    assert embedding.weight is None and model.lm_head.weight is None
    assert embedding.quantized is model.lm_head.quantized
    share = agreement(greedy(llm), reference)
    assert share >= bound, share


def test_lora_on_a_quantized_base_adds_the_float_delta(gemma_dir: Path, tmp_path: Path) -> None:
    """int8 base + adapter against the dequantized weights loaded as float, requantized in place to the format loading
    picks (the same codes and scales: a dequantized weight requantizes exactly), + the same adapter (itself checked
    against PEFT in test_lora.py): the delta is added in float on top of the quantized base, in prefill and decode."""
    dequantized_dir = tmp_path / "dequantized"
    dequantized_dir.mkdir()
    for path in gemma_dir.iterdir():
        if path.suffix != ".safetensors":
            (dequantized_dir / path.name).symlink_to(path)
            continue
        tensors = load_file(path)
        save_file({name: reference_dequantized(t, "int8", 0) if _is_decoder_projection(name) else t
                   for name, t in tensors.items()}, dequantized_dir / path.name, metadata={"format": "pt"})
    adapter = AdapterRef(str(save_random_adapter(gemma_dir, tmp_path / "adapter", seed=3, r=8, lora_alpha=16,
                                                 target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])),
                         source="local")
    prompt = " ".join(PROMPTS)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_logprobs=0)

    def run(model_dir: Path, quantized: bool, with_adapter: bool):
        llm = LLM(EngineConfig(model_id=str(model_dir), dtype="float32", device="cpu",
                               quantize="int8" if quantized else None, max_batch_prefill_tokens=256))
        if not quantized:  # the same int8 layers (and shared int8 table) as the quantized load, from the floats
            quantize_linear_weights(llm.engine.core.runner.model, lambda name: "w8a8" if name == "lm_head" else
                                    "int8" if _is_decoder_projection(f"{name}.weight") else None)
        result = llm.generate([prompt], params, [adapter if with_adapter else None])[0]
        return [entry[1] for entry in result.prompt_logprobs[1:]], result

    ours, ours_result = run(gemma_dir, True, True)
    expected, expected_result = run(dequantized_dir, False, True)
    assert len(ours) > KERNEL_MAX_ROWS
    assert ours == pytest.approx(expected, abs=1e-4)
    assert ours_result.token_ids == expected_result.token_ids
    assert [t.logprob for t in ours_result.tokens] == pytest.approx([t.logprob for t in expected_result.tokens],
                                                                     abs=0.05)
    base, _ = run(gemma_dir, True, False)  # not vacuous: the adapter changes the quantized model's output
    assert max(abs(a - b) for a, b in zip(ours, base)) > 0.1


def _is_decoder_projection(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def test_int4_refinement_never_loses_to_min_max() -> None:
    """Each group's least-squares steps are kept only when they lower its error, so no group ends worse than the
    min-max grid they start from, and on heavy-tailed weights the total is clearly lower."""
    torch.manual_seed(2)
    weight = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02
    groups = weight.reshape(64, 8, 32)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    origin = (zeros.float() - 8 * scales.float())[..., None]
    min_max = (torch.round((groups - origin) / scales.float()[..., None]).clamp(0, 15) * scales.float()[..., None]
               + origin - groups).square().sum(dim=-1)
    refined = (dequantize_codes(*int4_codes(weight, 32)) - weight).reshape(64, 8, 32).square().sum(dim=-1)
    assert (refined <= min_max * (1 + 1e-6)).all()
    assert refined.sum() < 0.9 * min_max.sum()


# ---------------------------------------------------------------------------------------------------- GGUF 4-bit

BF16_UNIT = 2.0**-8  # bf16 round-to-nearest: |x - bf16(x)| <= 2^-8 |x|
# Q4_K tensors of the default model's file (every o_proj is Q4_K, and half the down_projs)
DEFAULT_MODEL_Q4_K = ("blk.0.attn_output.weight", "blk.3.ffn_down.weight")


def from_codes_bound(scales: np.ndarray, zeros: np.ndarray, group: int = 32) -> np.ndarray:
    """`Int4Weight.from_codes`' stated bound per weight, 2^-8 (8 |scale| + |zero|), with a float32-sized slack for the
    float64 -> float32 -> bf16 double rounding."""
    bound = BF16_UNIT * (1 + 2.0**-16) * (8 * np.abs(scales) + np.abs(zeros))
    return np.repeat(bound, group, axis=1)


def check_ggml_int4(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, int]) -> None:
    """Codes, scales and zeros read from the blocks give gguf's own dequantization exactly; the packed weight is
    within the bf16 bound of it (plus the bf16 rounding of the kernel's output that `dequantize` goes through)."""
    expected = gguf.quants.dequantize(data, qtype).reshape(shape).astype(np.float64)
    codes, scales, zeros = ggml_int4_codes(data, qtype, shape)
    exact = dequantize_codes(*(torch.from_numpy(a) for a in (codes, scales, zeros)), dtype=torch.float64).numpy()
    np.testing.assert_allclose(exact, expected, rtol=1e-6, atol=1e-9)  # gguf computes in float32
    bound = from_codes_bound(scales, zeros)
    weight = int4_from_ggml(data, qtype, shape, torch.device("cpu"))
    assert weight.packed_for_kernel == (shape[0] % 16 == 0)
    output_rounding = BF16_UNIT * np.abs(expected) if weight.packed_for_kernel else 0
    error = np.abs(weight.dequantize().double().numpy() - expected)
    assert (error <= bound + output_rounding + 1e-9).all(), (error - bound - output_rounding).max()
    assert error.max() > 0  # the bf16 rounding is real, so the bound is what is tested


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1])
@pytest.mark.parametrize("rows", [64, 40])  # kernel layout; plain nibbles (40 % 16 != 0)
def test_gguf_q4_0_and_q4_1_blocks_map_onto_int4(qtype: gguf.GGMLQuantizationType, rows: int) -> None:
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((rows, 256)) * 0.05 + rng.standard_normal((rows, 1)) * 0.02).astype(np.float32)
    check_ggml_int4(gguf.quants.quantize(weight, qtype), qtype, (rows, 256))


@pytest.fixture(scope="module")
def default_gguf() -> gguf.GGUFReader:
    return gguf.GGUFReader(default_model_path(EngineConfig().cache_dir))


def test_gguf_q4_k_blocks_of_the_default_model_map_onto_int4(default_gguf: gguf.GGUFReader) -> None:
    tensors = {t.name: t for t in default_gguf.tensors}
    for name in DEFAULT_MODEL_Q4_K:
        tensor = tensors[name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_K
        check_ggml_int4(tensor.data, tensor.tensor_type, (int(tensor.shape[1]), int(tensor.shape[0])))
    q5_0 = tensors["blk.0.attn_q.weight"]
    with pytest.raises(ValueError, match="not a 4-bit block format"):
        ggml_int4_codes(q5_0.data, q5_0.tensor_type, (int(q5_0.shape[1]), int(q5_0.shape[0])))


def test_int4_load_of_the_default_model_keeps_the_files_4_bit_codes(default_gguf: gguf.GGUFReader) -> None:
    """Under --quantize int4 every Q4_K layer holds the file's codes and bf16-rounded scales and zeros, bit for bit
    (a requantization from float would pick its own scales and zeros), with no float weight left; the others are
    requantized from float: k and v projections (none Q4_K in this file) to int8, see engine/loading.py."""
    model = load(EngineConfig(quantize="int4")).model
    _, arch = gguf_loader.gguf_architecture(default_gguf)
    direct = 0
    for tensor in default_gguf.tensors:
        name = gguf_loader.hf_tensor_name(tensor.name, arch).removesuffix(".weight")
        module = model.get_submodule(name) if name.startswith("model.layers.") else None
        if not isinstance(module, Linear):
            continue
        expected_format = INT8_FORMS if name.endswith(("k_proj", "v_proj")) else Int4Weight
        assert module.weight is None and isinstance(module.quantized, expected_format), name
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_K:
            continue
        shape = (int(tensor.shape[1]), int(tensor.shape[0]))
        _, scales, zeros = ggml_int4_codes(tensor.data, tensor.tensor_type, shape)
        expected = torch.stack([torch.from_numpy(scales), torch.from_numpy(zeros)], dim=-1).to(torch.bfloat16)
        assert torch.equal(module.quantized.scales_and_zeros, expected.transpose(0, 1)), name
        expected_weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float64)
        error = np.abs(module.quantized.dequantize().double().numpy() - expected_weight)
        assert (error <= from_codes_bound(scales, zeros) + BF16_UNIT * np.abs(expected_weight) + 1e-9).all(), name
        direct += 1
    assert direct == 27  # 18 o_proj + 9 down_proj
