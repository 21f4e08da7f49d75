"""PEFT LoRA checkpoints -> per-module (A, scaled B) pairs, validated against the base model's projection shapes.

The scale (alpha / r, or alpha / sqrt(r) with rsLoRA; per-module ranks and alphas from `rank_pattern` and
`alpha_pattern`) is folded into B once at load, since (x A^T) (s B)^T = s (x A^T) B^T: the hot path never multiplies by
it. Features we do not serve (DoRA, LoRA biases, fan_in_fan_out, modules_to_save) are refused by name rather than
silently ignored.

Embedding LoRA (`lora_embedding_A` `[r, vocab]`, `lora_embedding_B` `[hidden, r]`) is the same product with the
one-hot token as input, so it is kept as a module with in = vocab and out = hidden. PEFT also saves a copy of each
targeted embedding-sized layer's frozen base weight (`base_layer.weight`, `save_embedding_layers`); that copy is
the base model's own table, so it is checked for shape and dropped rather than held in memory per adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraserve.errors import AdapterLoadError, AdapterNotFound

_PREFIX = "base_model.model."
# `<module>.lora_A.weight` (or `.lora_A.<adapter name>.weight`) and `<module>.lora_embedding_A` (`...A.<name>`)
_KEY = re.compile(
    r"(?P<module>.+)\.lora_(?:(?P<part>[AB])(?:\.[^.]+)?\.weight|embedding_(?P<embedding_part>[AB])(?:\.[^.]+)?)"
)
_BASE_COPY = re.compile(r"(?P<module>.+)\.base_layer\.weight")


@dataclass
class LoRAModule:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank], scale folded in
    scale: float = 1.0  # the LoRA scale folded into b, kept for merging (PEFT merges the unscaled B)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    name: str
    modules: dict[str, LoRAModule]  # keyed by the base model's module name, e.g. model.layers.0.self_attn.q_proj
    chat_template: str | None = None  # shipped with the adapter: chats with it are rendered with it

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values())


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's lookup: a pattern key matches a module name by suffix (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft_adapter(
    path: Path, name: str, projections: dict[str, tuple[int, int]], dtype: torch.dtype
) -> LoRAAdapter:
    """Read the PEFT folder at `path`; `projections` maps each LoRA-capable module name to (in, out) features."""
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterNotFound(f"adapter {name!r}: no adapter_config.json in {path}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json is not valid JSON: {error}") from error
    for flag, feature in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights"),
                          ("lora_bias", "LoRA biases")):
        if config.get(flag):
            raise AdapterLoadError(f"adapter {name!r} uses {feature}, which loraserve does not serve")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"adapter {name!r} is a {config.get('peft_type')} adapter, not LoRA")
    tensors = _read_tensors(path, name)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    base_copies: dict[str, torch.Size] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key.removeprefix(_PREFIX))
        if match is not None:
            pairs.setdefault(match["module"], {})[match["part"] or match["embedding_part"]] = tensor
        elif (copy := _BASE_COPY.fullmatch(key.removeprefix(_PREFIX))) is not None:
            base_copies[copy["module"]] = tensor.shape
        else:
            raise AdapterLoadError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight (modules_to_save "
                                   "are not served)")
    for module, shape in base_copies.items():
        _check_base_copy(name, module, shape, projections)
    modules = {}
    for module, pair in sorted(pairs.items()):
        modules[module] = _module(name, module, pair, config, projections, dtype)
    if not modules:
        raise AdapterLoadError(f"adapter {name!r} holds no LoRA weights")
    return LoRAAdapter(name, modules, _chat_template(path))


def _chat_template(path: Path) -> str | None:
    """The adapter's own chat template, where transformers keeps one: `chat_template.jinja`, else the
    `chat_template` of `tokenizer_config.json` (the named-templates list form: its "default")."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    config_path = path / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        template = json.loads(config_path.read_text()).get("chat_template")
    except json.JSONDecodeError as error:
        raise AdapterLoadError(f"adapter tokenizer_config.json is not valid JSON: {error}") from error
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _check_base_copy(name: str, module: str, shape: torch.Size, projections: dict[str, tuple[int, int]]) -> None:
    """The saved base weight must have the base model's shape, as a Linear `[out, in]` or an Embedding
    `[vocab, hidden]`: a resized vocabulary means the adapter belongs to another tokenizer."""
    if module not in projections:
        raise AdapterLoadError(f"adapter {name!r} carries a base weight for {module!r}, which the base model has no "
                               "LoRA-capable layer for (wrong base model?)")
    in_features, out_features = projections[module]
    if tuple(shape) not in ((out_features, in_features), (in_features, out_features)):
        raise AdapterLoadError(f"adapter {name!r}: its copy of {module}.weight has shape {tuple(shape)}, the base "
                               f"model's is ({out_features}, {in_features}) (a resized vocabulary or another base "
                               "model)")


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        if (path / "adapter_model.safetensors").is_file():
            return load_file(path / "adapter_model.safetensors")
        if (path / "adapter_model.bin").is_file():
            return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - safetensors and torch raise many types for a damaged file
        raise AdapterLoadError(f"adapter {name!r}: cannot read its weights: {error}") from error
    raise AdapterNotFound(f"adapter {name!r}: no adapter_model.safetensors or adapter_model.bin in {path}")


def _module(
    name: str, module: str, pair: dict[str, torch.Tensor], config: dict,
    projections: dict[str, tuple[int, int]], dtype: torch.dtype,
) -> LoRAModule:
    if module not in projections:
        raise AdapterLoadError(f"adapter {name!r} targets {module!r}, which the base model has no LoRA-capable "
                               "projection for (wrong base model?)")
    if set(pair) != {"A", "B"}:
        raise AdapterLoadError(f"adapter {name!r}: {module} lacks its lora_{'B' if 'A' in pair else 'A'} weight")
    a, b = pair["A"], pair["B"]
    in_features, out_features = projections[module]
    rank = a.shape[0]
    if a.shape != (rank, in_features) or b.shape != (out_features, rank):
        raise AdapterLoadError(
            f"adapter {name!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, but the base model needs "
            f"A (r, {in_features}) and B ({out_features}, r) (wrong base model?)"
        )
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoRAModule(a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous(), scale)
