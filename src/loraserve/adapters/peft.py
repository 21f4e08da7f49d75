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
import time
from dataclasses import dataclass, field
from pathlib import Path

import regex
import torch
from safetensors.torch import load_file

from loraserve.errors import AdapterLoadError, AdapterNotFound

PICKLE_FLAG = "--allow-pickle-adapters"

_PREFIX = "base_model.model."
# `<module>.lora_A.weight` (or `.lora_A.<adapter name>.weight`) and `<module>.lora_embedding_A` (`...A.<name>`)
_KEY = re.compile(
    r"(?P<module>.+)\.lora_(?:(?P<part>[AB])(?:\.[^.]+)?\.weight|embedding_(?P<embedding_part>[AB])(?:\.[^.]+)?)"
)
_BASE_COPY = re.compile(r"(?P<module>.+)\.base_layer\.weight")

DEFAULT_MAX_ADAPTER_BYTES = 4 << 30  # weights of one adapter, on disk and in memory
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json
MAX_TOKENIZER_CONFIG_BYTES = 32 << 20  # tokenizer_config.json (added-token tables can be large)
MAX_CHAT_TEMPLATE_BYTES = 1 << 20
MAX_PATTERN_KEYS = 1000  # per rank_pattern / alpha_pattern (and entries of a target_modules list)
MAX_PATTERN_KEY_CHARS = 256  # module names are short; a longer key is no module's suffix
MAX_TARGET_MODULES_CHARS = 10_000  # target_modules given as one regular expression
PATTERN_MATCH_BUDGET_S = 1.0  # matching all of one adapter's non-plain pattern keys
_PLAIN_KEY = re.compile(r"[\w.\-]*")  # no groups, no quantifiers: matching cannot backtrack badly


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


class _Patterns:
    r"""A `rank_pattern` / `alpha_pattern` with PEFT's lookup (`get_pattern_key`): the first key, in file order, for
    which `re.match(rf"(.*\.)?({key})$", module)` matches gives the module its value.

    The keys come from an uploaded file, so matching them is bounded: at most MAX_PATTERN_KEYS keys of at most
    MAX_PATTERN_KEY_CHARS characters, each compiled with `re` first (a key `re` refuses is refused, as PEFT would
    fail on it). Plain keys (letters, digits, `_`, `-`, `.`) cannot backtrack catastrophically and are matched with
    `re` itself; any other key is matched with the `regex` engine (the same syntax and semantics for what `re`
    compiles) under a time budget shared by the whole adapter, so a key like `(a+)+$` cannot stall the server.
    """

    def __init__(self, entries: list[tuple[str, re.Pattern | regex.Pattern, bool, float]]) -> None:
        self.entries = entries  # (key, compiled, plain, value)

    def lookup(self, name: str, module: str, field: str, default: float, deadline: float) -> float:
        for key, compiled, plain, value in self.entries:
            if plain:
                found = compiled.match(module) is not None
            else:
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    found = compiled.match(module, timeout=remaining) is not None
                except TimeoutError:
                    raise AdapterLoadError(f"adapter {name!r}: matching the {field} keys against the module names "
                                           f"takes too long (key {_short(key)!r}); use plainer patterns") from None
            if found:
                return value
        return default


@dataclass(frozen=True)
class LoraSettings:
    """What loraserve reads from a PEFT `adapter_config.json`, validated (`parse_adapter_config`)."""

    r: int = 8  # PEFT's defaults, for a config that leaves a field out
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: _Patterns = field(default_factory=lambda: _Patterns([]))
    alpha_pattern: _Patterns = field(default_factory=lambda: _Patterns([]))
    target_modules: str | tuple[str, ...] | None = None

    def rank_for(self, name: str, module: str, deadline: float) -> int:
        return int(self.rank_pattern.lookup(name, module, "rank_pattern", self.r, deadline))

    def alpha_for(self, name: str, module: str, deadline: float) -> float:
        return self.alpha_pattern.lookup(name, module, "alpha_pattern", self.lora_alpha, deadline)

    def scale(self, alpha: float, rank: int) -> float:
        """PEFT's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flag(name: str, config: dict, key: str) -> bool:
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `{key}` must be true or false, not "
                               f"{_short(json.dumps(value))}")
    return value


def _compile_key(name: str, field_name: str, key: object) -> tuple[re.Pattern | regex.Pattern, bool]:
    if not isinstance(key, str):
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `{field_name}` keys must be strings")
    if len(key) > MAX_PATTERN_KEY_CHARS:
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `{field_name}` key {_short(key)!r} is longer "
                               f"than {MAX_PATTERN_KEY_CHARS} characters")
    wrapped = rf"(.*\.)?({key})$"  # exactly PEFT's pattern
    try:
        compiled = re.compile(wrapped)
    except (re.error, RecursionError, OverflowError, ValueError) as error:
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `{field_name}` key {_short(key)!r} is not a "
                               f"valid regular expression: {error}") from None
    if _PLAIN_KEY.fullmatch(key):
        return compiled, True
    try:
        return regex.compile(wrapped, flags=regex.V0), False
    except (regex.error, RecursionError, OverflowError, ValueError) as error:
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `{field_name}` key {_short(key)!r} is not "
                               f"a supported regular expression: {error}") from None


def _patterns(name: str, config: dict, field_name: str, is_valid, kind: str) -> _Patterns:
    raw = config.get(field_name)
    if raw is None:
        return _Patterns([])
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `{field_name}` must be an object mapping "
                               f"module patterns to {kind}")
    if len(raw) > MAX_PATTERN_KEYS:
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `{field_name}` has {len(raw)} keys; at most "
                               f"{MAX_PATTERN_KEYS} are served")
    entries = []
    for key, value in raw.items():
        compiled, plain = _compile_key(name, field_name, key)
        if not is_valid(value):
            raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `{field_name}[{_short(key)!r}]` must be "
                                   f"{kind}, not {_short(json.dumps(value))}")
        entries.append((key, compiled, plain, value))
    return _Patterns(entries)


def parse_adapter_config(config: object, name: str) -> LoraSettings:
    """Validate a parsed `adapter_config.json`: anything malformed raises `AdapterLoadError` naming the field.

    Valid configs get PEFT's semantics: `r` and `lora_alpha` default to 8, `rank_pattern` / `alpha_pattern` override
    them per module (first matching key wins), `use_rslora` scales by alpha / sqrt(r). Features loraserve does not
    serve (DoRA, LoRA biases, fan_in_fan_out, other PEFT types) are refused by name.
    """
    if not isinstance(config, dict):
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `peft_type` must be a string")
    for flag, feature in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights"),
                          ("lora_bias", "LoRA biases")):
        if _flag(name, config, flag):
            raise AdapterLoadError(f"adapter {name!r} uses {feature}, which loraserve does not serve")
    if peft_type != "LORA":
        raise AdapterLoadError(f"adapter {name!r} is a {_short(peft_type)} adapter, not LoRA")
    r = config.get("r", 8)
    if not _is_int(r) or r <= 0:
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `r` must be a positive integer, not "
                               f"{_short(json.dumps(r))}")
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `lora_alpha` must be a finite number, not "
                               f"{_short(json.dumps(alpha))}")
    target_modules = config.get("target_modules")
    if isinstance(target_modules, str):
        if len(target_modules) > MAX_TARGET_MODULES_CHARS:
            raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `target_modules` is longer than "
                                   f"{MAX_TARGET_MODULES_CHARS} characters")
        try:
            re.compile(target_modules)  # PEFT reads a string as a regular expression (fullmatch)
        except (re.error, RecursionError, OverflowError, ValueError) as error:
            raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `target_modules` is not a valid regular "
                                   f"expression: {error}") from None
    elif isinstance(target_modules, list):
        if len(target_modules) > MAX_PATTERN_KEYS or not all(
                isinstance(t, str) and 0 < len(t) <= MAX_PATTERN_KEY_CHARS for t in target_modules):
            raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `target_modules` must be a list of at most "
                                   f"{MAX_PATTERN_KEYS} module names of 1 to {MAX_PATTERN_KEY_CHARS} characters")
        target_modules = tuple(target_modules)
    elif target_modules is not None:
        raise AdapterLoadError(f"adapter {name!r}: adapter_config.json `target_modules` must be a list of module "
                               "names or a regular expression")
    return LoraSettings(
        r=r, lora_alpha=alpha, use_rslora=_flag(name, config, "use_rslora"),
        rank_pattern=_patterns(name, config, "rank_pattern", lambda v: _is_int(v) and v > 0, "a positive integer"),
        alpha_pattern=_patterns(name, config, "alpha_pattern", _is_number, "a finite number"),
        target_modules=target_modules,
    )


def _read_json(path: Path, name: str, limit: int) -> object:
    try:
        size = path.stat().st_size
        if size > limit:
            raise AdapterLoadError(f"adapter {name!r}: {path.name} is {size} bytes; at most {limit} are read")
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, over-long integers, deep nesting
        raise AdapterLoadError(f"adapter {name!r}: {path.name} is not valid JSON: "
                               f"{_short(str(error) or type(error).__name__, 200)}") from None
    except OSError as error:
        raise AdapterLoadError(f"adapter {name!r}: cannot read {path.name} ({error.strerror or 'I/O error'})") from None


def load_peft_adapter(
    path: Path, name: str, projections: dict[str, tuple[int, int]], dtype: torch.dtype, *,
    allow_pickle: bool = False, max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
) -> LoRAAdapter:
    """Read the PEFT folder at `path`; `projections` maps each LoRA-capable module name to (in, out) features.

    Weights are read from `adapter_model.safetensors`; a folder with only `adapter_model.bin` (a pickle) is read
    only with `allow_pickle`, and then only with `torch.load(weights_only=True)`. The weights may take at most
    `max_bytes`, and every tensor must be finite. Error messages name the adapter and the file, never the folder.
    """
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterNotFound(f"adapter {name!r}: no adapter_config.json")
    settings = parse_adapter_config(_read_json(config_path, name, MAX_CONFIG_BYTES), name)
    tensors = _read_tensors(path, name, allow_pickle, max_bytes)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    base_copies: dict[str, torch.Size] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key.removeprefix(_PREFIX))
        if match is not None:
            part = match["part"] or match["embedding_part"]
            label = f"lora_{part}" if match["part"] else f"lora_embedding_{part}"
            if not tensor.is_floating_point():
                raise AdapterLoadError(f"adapter {name!r}: {label} of {match['module']} has dtype {tensor.dtype}, "
                                       "not a floating-point type")
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterLoadError(f"adapter {name!r}: {label} of {match['module']} holds inf/nan")
            pairs.setdefault(match["module"], {})[part] = tensor
        elif (copy := _BASE_COPY.fullmatch(key.removeprefix(_PREFIX))) is not None:
            base_copies[copy["module"]] = tensor.shape
        else:
            raise AdapterLoadError(f"adapter {name!r}: tensor {_short(key, 200)!r} is not a LoRA A/B weight "
                                   "(modules_to_save are not served)")
    for module, shape in base_copies.items():
        _check_base_copy(name, module, shape, projections)
    modules = {}
    deadline = time.monotonic() + PATTERN_MATCH_BUDGET_S
    for module, pair in sorted(pairs.items()):
        modules[module] = _module(name, module, pair, settings, projections, dtype, deadline)
    if not modules:
        raise AdapterLoadError(f"adapter {name!r} holds no LoRA weights")
    return LoRAAdapter(name, modules, _chat_template(path, name))


def _chat_template(path: Path, name: str) -> str | None:
    """The adapter's own chat template, where transformers keeps one: `chat_template.jinja`, else the
    `chat_template` of `tokenizer_config.json` (the named-templates list form: its "default")."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        try:
            if jinja.stat().st_size > MAX_CHAT_TEMPLATE_BYTES:
                raise AdapterLoadError(f"adapter {name!r}: chat_template.jinja is larger than "
                                       f"{MAX_CHAT_TEMPLATE_BYTES} bytes")
            return jinja.read_bytes().decode()
        except UnicodeDecodeError:
            raise AdapterLoadError(f"adapter {name!r}: chat_template.jinja is not UTF-8 text") from None
        except OSError as error:
            raise AdapterLoadError(f"adapter {name!r}: cannot read chat_template.jinja "
                                   f"({error.strerror or 'I/O error'})") from None
    config_path = path / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    config = _read_json(config_path, name, MAX_TOKENIZER_CONFIG_BYTES)
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
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


def _read_tensors(path: Path, name: str, allow_pickle: bool, max_bytes: int) -> dict[str, torch.Tensor]:
    safetensors, pickle = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if safetensors.is_file():
        file = safetensors
    elif pickle.is_file():
        if not allow_pickle:
            raise AdapterLoadError(f"adapter {name!r} ships its weights only as adapter_model.bin, a pickle; this "
                                   f"server reads pickled adapters only when started with {PICKLE_FLAG} (or convert "
                                   "the adapter to adapter_model.safetensors)")
        file = pickle
    else:
        raise AdapterNotFound(f"adapter {name!r}: no adapter_model.safetensors"
                              + ("" if allow_pickle else f" (adapter_model.bin is read only with {PICKLE_FLAG})"))
    try:
        size = file.stat().st_size
    except OSError as error:
        raise AdapterLoadError(f"adapter {name!r}: cannot read {file.name} ({error.strerror or 'I/O error'})") from None
    if size > max_bytes:
        raise AdapterLoadError(f"adapter {name!r}: {file.name} is {size} bytes, over this server's limit of "
                               f"{max_bytes} bytes per adapter")
    try:
        if file is safetensors:
            tensors = load_file(file)
        else:  # weights_only: an unpickler that builds tensors and containers only, never calls arbitrary code
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - safetensors and torch raise many types for a damaged file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].replace(str(path), "<adapter>")
        raise AdapterLoadError(f"adapter {name!r}: cannot read its weights from {file.name}: "
                               f"{_short(reason, 200)}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise AdapterLoadError(f"adapter {name!r}: {file.name} does not hold a mapping of names to tensors")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total > max_bytes:
        raise AdapterLoadError(f"adapter {name!r}: its weights take {total} bytes, over this server's limit of "
                               f"{max_bytes} bytes per adapter")
    return tensors


def _module(
    name: str, module: str, pair: dict[str, torch.Tensor], settings: LoraSettings,
    projections: dict[str, tuple[int, int]], dtype: torch.dtype, deadline: float,
) -> LoRAModule:
    if module not in projections:
        raise AdapterLoadError(f"adapter {name!r} targets {_short(module, 200)!r}, which the base model has no "
                               "LoRA-capable projection for (wrong base model?)")
    if set(pair) != {"A", "B"}:
        raise AdapterLoadError(f"adapter {name!r}: {module} lacks its lora_{'B' if 'A' in pair else 'A'} weight")
    a, b = pair["A"], pair["B"]
    in_features, out_features = projections[module]
    rank = a.shape[0] if a.dim() == 2 else 0
    if rank == 0 or a.shape != (rank, in_features) or b.shape != (out_features, rank):
        raise AdapterLoadError(
            f"adapter {name!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, but the base model needs "
            f"A (r, {in_features}) and B ({out_features}, r) (wrong base model?)"
        )
    configured = settings.rank_for(name, module, deadline)
    if configured != rank:
        raise AdapterLoadError(f"adapter {name!r}: {module} has rank {rank}, but adapter_config.json gives it rank "
                               f"{configured} (`r` / `rank_pattern`)")
    scale = settings.scale(settings.alpha_for(name, module, deadline), rank)
    a_out = a.to(dtype).contiguous()
    b_out = (b.float() * scale).to(dtype).contiguous()
    if not bool(torch.isfinite(a_out).all()) or not bool(torch.isfinite(b_out).all()):
        raise AdapterLoadError(f"adapter {name!r}: {module} overflows {str(dtype).removeprefix('torch.')} once "
                               f"scaled by {scale:g} (lora_alpha / r)")
    return LoRAModule(a_out, b_out, scale)
