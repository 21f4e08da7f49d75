"""What every peer loads, built once and cached under ~/.cache/loraserve/bench/: the default model as an HF folder
(vLLM and transformers need one) and fleets of random rank-16 PEFT adapters, on all seven projections unless told
otherwise."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from loraserve.config import EngineConfig
from loraserve.models.default_model import default_model_path

# the benchmark scripts beside this package import each other as top-level modules; so do we
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_throughput import alias_adapter, write_adapter  # noqa: E402
from results_file import machine, replace_section  # noqa: E402

__all__ = ["ALL_TARGETS", "CACHE", "adapter_fleet", "gguf_path", "hf_model_dir", "machine", "projections",
           "replace_section"]

CACHE = Path(os.environ.get("LORASERVE_BENCH_CACHE", Path.home() / ".cache" / "loraserve" / "bench"))
RANK = 16
REAL_ADAPTERS = 32  # beyond these, adapter folders alias their weight files (15 MB each in fp32)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def gguf_path() -> Path:
    return default_model_path(EngineConfig().cache_dir)


def hf_model_dir() -> Path:
    """The GGUF, dequantized by transformers, saved as a plain HF folder. A GGUF-loaded model refuses
    `save_pretrained`, so its state dict goes into a model built with `from_config`."""
    target = CACHE / "gemma-3-270m-hf"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    staging = target.with_name(target.name + ".partial")
    plain.save_pretrained(staging)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    config = json.loads((staging / "config.json").read_text())
    config.pop("quantization_config", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    staging.rename(target)
    return target


def projections(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(fan_in, fan_out) of every q/k/v/o/gate/up/down projection, keyed by its HF module name."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    shapes = {"self_attn.q_proj": (hidden, heads * head_dim), "self_attn.k_proj": (hidden, kv_heads * head_dim),
              "self_attn.v_proj": (hidden, kv_heads * head_dim), "self_attn.o_proj": (heads * head_dim, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    return {f"model.layers.{layer}.{name}": shape
            for layer in range(config["num_hidden_layers"]) for name, shape in shapes.items()}


def adapter_fleet(count: int, model_dir: Path, targets: tuple[str, ...] = ALL_TARGETS) -> list[Path]:
    """`count` adapter folders named adapter-0000...; the first 32 are real, the rest alias them round-robin (each
    is still read, validated and cached as its own adapter by the servers). Adapters on fewer `targets` than all
    seven are named after them (adapter-q_proj-v_proj-0000...), so a server given several fleets tells them apart."""
    if not targets or not set(targets) <= set(ALL_TARGETS):
        raise ValueError(f"targets must be some of {ALL_TARGETS}, got {targets}")
    tag = "" if targets == ALL_TARGETS else "-" + "-".join(targets)
    root = CACHE / f"adapters{tag}"
    shapes = {name: shape for name, shape in projections(model_dir).items() if name.rsplit(".", 1)[-1] in targets}
    fleet = [root / f"adapter{tag}-{i:04d}" for i in range(count)]
    for i, path in enumerate(fleet):
        if not (path / "adapter_config.json").exists():
            if i < REAL_ADAPTERS:
                write_adapter(path, shapes, RANK, seed=i)
            else:
                alias_adapter(adapter_fleet(REAL_ADAPTERS, model_dir, targets)[i % REAL_ADAPTERS], path)
    return fleet
