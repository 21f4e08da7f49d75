"""Llama-family and Phi-3 models against transformers, through our loader and the paged KV cache; loader behaviour.

Each tiny random checkpoint (2 layers, hidden 64, 4 heads, 2 KV heads) is saved as a sharded HF folder, loaded by
`load_model` in float32 and compared with transformers' eager implementation on the same folder: relative error
max|ours - ref| / max|ref| <= 1e-4 for (a) three prompts of different lengths prefilled together in one flat step
(logits at every position) and (b) the same prompts prefilled in two chunks over two steps, then three steps that
decode all sequences together (last-token logits after every step, against transformers on the whole sequence), and
(c) a step mixing one sequence's decode with the others' prefill chunks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from model_harness import batched_prefill_errors, chunked_decode_errors
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model, tiny_config
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config, PretrainedConfig, Qwen2Config

from loraserve.errors import ModelLoadError
from loraserve.models.loader import build_model, load_model, resolve_model_dir

TOLERANCE = 1e-4
PROMPTS = [list(range(3, 20)), list(range(40, 47)), list(range(100, 124))]  # 17, 7 and 24 tokens
_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512,
)


def _config(name: str) -> PretrainedConfig:
    """The shared tiny configs, plus variants for the switches they leave off."""
    variants = {
        # Llama 3.2-style: biases everywhere, tied embeddings, and a second rope scaling kind.
        "llama_bias_tied_yarn": lambda: LlamaConfig(
            **_COMMON, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        ),
        # Only layers from max_window_layers on slide; the window (6) is shorter than every prompt.
        "qwen2_sliding": lambda: Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=1),
        # Phi-4-mini-style partial rotary with LongRoPE. An original length of 2 puts every sequence of the test past
        # it, where transformers uses the long factors, as we always do for max_position_embeddings > original.
        "phi3_longrope_partial": lambda: Phi3Config(
            **_COMMON, original_max_position_embeddings=2,
            rope_scaling={"rope_type": "longrope", "partial_rotary_factor": 0.5,
                          "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]},
        ),
    }
    if name not in variants:
        return tiny_config(name)
    config = variants[name]()
    config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
    return config


FAMILIES = ["llama", "llama3", "llama_bias_tied_yarn", "mistral", "qwen2", "qwen2_sliding", "qwen3", "phi3",
            "phi3_longrope_partial"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, save_tiny_model(_config(request.param), tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def models(family: tuple[str, Path]) -> tuple[torch.nn.Module, torch.nn.Module]:
    _, model_dir = family
    ours = load_model(model_dir, torch.float32, torch.device("cpu"))
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return ours, ref


def _assert_close(name: str, errors: dict[str, float]) -> None:
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{name} {worst}: relative error {errors[worst]:.2e}"


def test_batched_prefill_matches_transformers(family: tuple[str, Path], models: tuple) -> None:
    _assert_close(family[0], batched_prefill_errors(*models, PROMPTS))


def test_chunked_prefill_and_batched_decode_match_transformers(family: tuple[str, Path], models: tuple) -> None:
    _assert_close(family[0], chunked_decode_errors(*models, PROMPTS, decode_steps=3))


def test_mixed_prefill_and_decode_step_matches_transformers(family: tuple[str, Path], models: tuple) -> None:
    """The second prompt is prefilled whole in the first step, so the second step mixes its decode with prefills."""
    _assert_close(family[0], chunked_decode_errors(*models, PROMPTS, decode_steps=1, first_chunks=[5, 7, 9]))


def test_structure_follows_the_config() -> None:
    """Switches the parity tests could pass without (a zero bias, say) are checked on the modules themselves."""
    tied = build_model(_config("llama_bias_tied_yarn"), torch.float32, torch.device("cpu"))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    attn = tied.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is not None
    assert tied.model.layers[0].mlp.down_proj.bias is not None

    qwen2 = build_model(_config("qwen2_sliding"), torch.float32, torch.device("cpu"))
    qwen2_attn = qwen2.model.layers[0].self_attn
    assert qwen2_attn.q_proj.bias is not None and qwen2_attn.o_proj.bias is None
    assert [layer.sliding_window for layer in qwen2.attention_layers()] == [None, 6]
    plain_qwen2 = build_model(_config("qwen2"), torch.float32, torch.device("cpu"))  # use_sliding_window is off
    assert [layer.sliding_window for layer in plain_qwen2.attention_layers()] == [None, None]
    mistral = build_model(_config("mistral"), torch.float32, torch.device("cpu"))
    assert [layer.sliding_window for layer in mistral.attention_layers()] == [6, 6]

    phi3 = build_model(_config("phi3_longrope_partial"), torch.bfloat16, torch.device("cpu"))
    assert phi3.model.rotary.rotary_dim == 8 and phi3.model.rotary.inv_freq.dtype == torch.float32
    assert phi3.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert {name.split(".")[-2] for name, _ in phi3.named_parameters() if "layers.0." in name} >= {
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"
    }


def _copy(model_dir: Path, destination: Path) -> Path:
    shutil.copytree(model_dir, destination)
    return destination


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tiny_config("llama"), tmp_path_factory.mktemp("llama_loader"))


def test_single_file_checkpoint_loads_like_the_sharded_one(llama_dir: Path, tmp_path: Path) -> None:
    single = _copy(llama_dir, tmp_path / "single")
    index = json.loads((single / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(single / shard))
        (single / shard).unlink()
    (single / "model.safetensors.index.json").unlink()
    save_file(tensors, single / "model.safetensors")
    sharded = load_model(llama_dir, torch.float32, torch.device("cpu"))
    whole = load_model(single, torch.float32, torch.device("cpu"))
    for (name, a), (_, b) in zip(sharded.named_parameters(), whole.named_parameters()):
        assert torch.equal(a, b), name


def test_missing_tensor_is_named(llama_dir: Path, tmp_path: Path) -> None:
    broken = _copy(llama_dir, tmp_path / "broken")
    weight_map = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    shard = broken / weight_map["model.layers.1.mlp.up_proj.weight"]
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, shard)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(broken, torch.float32, torch.device("cpu"))


def test_folders_without_weights_or_config_fail_cleanly(llama_dir: Path, tmp_path: Path) -> None:
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(llama_dir / "config.json", no_weights)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(no_weights, torch.float32, torch.device("cpu"))
    with pytest.raises(ModelLoadError, match="config"):
        load_model(tmp_path, torch.float32, torch.device("cpu"))
    assert resolve_model_dir(str(llama_dir)) == llama_dir
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nowhere"))


def test_hub_download_fetches_only_what_loading_reads(llama_dir: Path, tmp_path: Path) -> None:
    """Other weight formats in the repo (Mistral's consolidated.safetensors, .bin, .gguf) are never downloaded."""
    repo = _copy(llama_dir, tmp_path / "repo")
    for extra in ["consolidated.safetensors", "pytorch_model.bin", "model-q4.gguf"]:
        (repo / extra).write_bytes(b"\0" * 1024)
    cache = tmp_path / "cache"
    script = (
        "import sys; from loraserve.models.loader import resolve_model_dir; "
        "print(resolve_model_dir('acme/tiny', cache_dir=sys.argv[1]))"
    )
    with HubServer() as hub:
        hub.add_repo("acme/tiny", repo)
        result = subprocess.run(
            [sys.executable, "-c", script, str(cache)], capture_output=True, text=True, timeout=120,
            env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
        )
    assert result.returncode == 0, result.stderr[-2000:]
    snapshot = Path(result.stdout.strip().splitlines()[-1])
    fetched = {path.name for path in snapshot.iterdir()}
    assert fetched == {path.name for path in llama_dir.iterdir()}
    loaded = load_model(snapshot, torch.float32, torch.device("cpu"))
    assert loaded.config.model_type == "llama"
