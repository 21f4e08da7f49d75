"""Every setting of the engine and the server: names, environment variables, defaults and validation.

This is the only module that reads `os.environ`. Flag names follow the LoRAX launcher where they apply, and each
flag can also be given through the environment variable LoRAX uses (`MODEL_ID`, `PORT`, ...). The one exception is
`--hostname`: shells export `HOSTNAME` as the machine's name, so binding to it by accident would expose the server
on the network; we read `LORASERVE_HOSTNAME` instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_SOURCES = ("hub", "local", "s3")
QUANTIZE_FORMATS = ("int8", "int4")  # weight-only formats of loraserve.quant


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def default_cache_dir() -> Path:
    """Where assembled models, converted tokenizers and downloaded adapters live (LORASERVE_CACHE, else ~/.cache)."""
    return Path(_env("LORASERVE_CACHE", str(Path.home() / ".cache" / "loraserve")))


def hf_token_from_env() -> str | None:
    return _env("HF_TOKEN") or _env("HUGGING_FACE_HUB_TOKEN")


@dataclass(frozen=True)
class LoRAModule:
    """An adapter registered under a name at start (vLLM's `--lora-modules`)."""

    name: str
    path: str
    source: str


def parse_lora_module(entry: str, default_source: str) -> LoRAModule:
    """`NAME=PATH` (at the default adapter source) or vLLM's JSON form `{"name", "path"}`, with an optional
    `"source"` (hub, local or s3)."""
    entry = entry.strip()
    if entry.startswith("{"):
        try:
            fields = json.loads(entry)
        except json.JSONDecodeError as error:
            raise ValueError(f"--lora-modules {entry!r} is not valid JSON: {error}") from error
        if not isinstance(fields, dict) or not isinstance(fields.get("name"), str) or not isinstance(
                fields.get("path"), str):
            raise ValueError(f"--lora-modules {entry!r}: the JSON form needs string fields name and path")
        name, path, source = fields["name"], fields["path"], fields.get("source", default_source)
    else:
        name, sep, path = entry.partition("=")
        source = default_source
        if not sep:
            raise ValueError(f"--lora-modules {entry!r}: expected NAME=PATH")
    if not name or not path:
        raise ValueError(f"--lora-modules {entry!r}: both the name and the path must be given")
    if source not in ADAPTER_SOURCES:
        raise ValueError(f"--lora-modules {entry!r}: source must be one of {list(ADAPTER_SOURCES)}")
    return LoRAModule(name, path, source)


@dataclass
class EngineConfig:
    """What the engine needs to load a model and size its KV cache and batches."""

    model_id: str | None = None  # HF folder, Hub id or .gguf path; None = the bundled default Gemma 3 270M
    revision: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bfloat16 on CPUs and GPUs that have it)
    device: str = "auto"  # auto | cpu | cuda
    quantize: str | None = None  # None | int8 | int4: linear layers, weight-only (k/v under int4: int8; lm_head: w8a8)
    max_input_length: int = 1024  # longest prompt, in tokens
    max_total_tokens: int = 2048  # prompt + generated, per request
    max_batch_prefill_tokens: int = 4096  # tokens computed per step (prefill chunks plus decodes)
    max_batch_total_tokens: int | None = None  # KV capacity in tokens; None = from kv_cache_memory
    max_running_requests: int = 64  # sequences decoded together
    kv_cache_memory: int = 1 << 30  # bytes for the KV pool when max_batch_total_tokens is not set
    block_size: int = 16
    max_active_adapters: int = 1024  # adapters on the device at once (LoRAX's default); 0 disables LoRA
    max_lora_rank: int | None = None  # refuse adapters of a larger rank; None = any rank (device memory follows it)
    adapter_device_memory: int = 1 << 30  # bytes of adapter weights in the model's LoRA layers at once
    adapter_memory: int = 1 << 30  # bytes of adapters kept in host memory (LRU) beyond the device tier
    adapter_source: str = "hub"  # where adapters named without a source come from (LoRAX's ADAPTER_SOURCE)
    lora_modules: tuple[str, ...] = ()  # adapters registered by name at start: NAME=PATH or vLLM's JSON form
    adapter_root: tuple[Path, ...] = ()  # local adapters resolve inside these folders only; none = anywhere
    allowed_s3_buckets: tuple[str, ...] = ()  # none = every bucket
    allowed_hub_orgs: tuple[str, ...] = ()  # none = every Hub user and organisation
    max_adapter_bytes: int = 4 << 30  # one adapter's weights, checked before downloading and when read
    allow_pickle_adapters: bool = False  # read adapter_model.bin (with torch.load(weights_only=True))
    adapter_download_timeout: float = 120.0  # seconds a request waits for its adapter's download (Hub, S3) or read
    max_request_seconds: float = 600.0  # the longest deadline a request may have (and the deadline of those without)
    cache_dir: Path = field(default_factory=default_cache_dir)
    hf_token: str | None = field(default_factory=hf_token_from_env)
    # Lend the server's HF token to adapter downloads of requests that bring none (LoRAX: LORAX_USE_GLOBAL_HF_TOKEN).
    # Off by default: it lets every client read what the server's token can read.
    adapter_uses_server_token: bool = False
    s3_endpoint_url: str | None = field(default_factory=lambda: _env("S3_ENDPOINT_URL"))  # S3-compatible stores
    seed: int = 0  # seeds the shared generator of unseeded sampled requests

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_FORMATS:
            raise ValueError(f"quantize must be None or one of {list(QUANTIZE_FORMATS)}, got {self.quantize!r}")
        for name in ("max_input_length", "max_total_tokens", "max_batch_prefill_tokens", "max_running_requests",
                     "block_size", "kv_cache_memory", "adapter_device_memory", "adapter_memory", "max_adapter_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_active_adapters < 0:
            raise ValueError(f"max_active_adapters must be >= 0, got {self.max_active_adapters}")
        for name in ("adapter_download_timeout", "max_request_seconds"):
            if not getattr(self, name) > 0:  # NaN too
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.adapter_source not in ADAPTER_SOURCES:
            raise ValueError(f"adapter_source must be one of {list(ADAPTER_SOURCES)}, got {self.adapter_source!r}")
        self.lora_modules = tuple(self.lora_modules)
        self.adapter_root = tuple(Path(root) for root in self.adapter_root)
        self.allowed_s3_buckets, self.allowed_hub_orgs = tuple(self.allowed_s3_buckets), tuple(self.allowed_hub_orgs)
        for entry in self.lora_modules:
            parse_lora_module(entry, self.adapter_source)
        if self.max_input_length >= self.max_total_tokens:
            raise ValueError(
                f"max_input_length ({self.max_input_length}) must be < max_total_tokens ({self.max_total_tokens})"
            )
        if self.max_batch_total_tokens is not None and self.max_batch_total_tokens < self.max_total_tokens:
            raise ValueError(
                f"max_batch_total_tokens ({self.max_batch_total_tokens}) must be >= max_total_tokens "
                f"({self.max_total_tokens}) so that one request can always finish"
            )
        self.cache_dir = Path(self.cache_dir)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        device = self.torch_device()
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16


@dataclass
class ServerConfig:
    hostname: str = "127.0.0.1"
    port: int = 3000  # LoRAX's launcher default
    max_concurrent_requests: int = 128  # requests in flight before the server answers 429
    otlp_endpoint: str | None = None  # an OTLP/HTTP collector (e.g. http://collector:4318): spans per request
    api_key: tuple[str, ...] = ()  # keys every caller must present (see server/auth.py); none = open
    api_keys_file: Path | None = None  # JSON: keys with their tenant and the adapters and sources each may use
    metrics_require_key: bool = False  # /metrics needs a key too (it is open by default, for scrapers)
    max_request_bytes: int = 8 << 20  # larger bodies answer 413 before they are parsed
    shutdown_timeout: float = 30.0  # seconds a signal lets accepted requests finish before ending them
    stream_idle_timeout: float = 60.0  # seconds a response may wait on a client that reads nothing before it ends
    ray_replicas: int = 0  # > 0: serve through Ray Serve with this many engine replicas and adapter affinity
    ray_autoscaling_config: dict | None = None  # Ray Serve's autoscaling_config, instead of a fixed ray_replicas
    # what one request may ask for (server/limits.py); over a limit: 422 naming its flag
    max_stop_sequences: int = 4  # LoRAX's default
    max_stop_sequence_length: int = 256  # characters per stop sequence
    max_best_of: int = 2  # LoRAX's `best_of` (LoRAX's default)
    max_n: int = 16  # OpenAI's `n`: choices per request
    max_merged_adapters: int = 32  # `merged_adapters.ids` per request
    max_json_schema_bytes: int = 64 << 10  # a constrained request's JSON schema, as compact JSON
    max_json_schema_depth: int = 64  # nesting of objects and arrays in that schema
    max_regex_length: int = 4096  # characters of a constrained request's regex
    # per tenant (per client address on a server without keys): 429 with Retry-After over it; 0 = no limit
    rate_limit_per_minute: float = 0.0
    rate_limit_burst: int | None = None  # requests at once before the rate applies; None = a minute's worth

    def __post_init__(self) -> None:
        if self.otlp_endpoint is not None and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"otlp_endpoint must be an http(s) URL, got {self.otlp_endpoint!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.ray_replicas < 0:
            raise ValueError(f"ray_replicas must be >= 0, got {self.ray_replicas}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if not self.stream_idle_timeout > 0:  # NaN too
            raise ValueError(f"stream_idle_timeout must be > 0 seconds, got {self.stream_idle_timeout}")
        for name in ("max_stop_sequences", "max_stop_sequence_length", "max_best_of", "max_n", "max_merged_adapters",
                     "max_json_schema_bytes", "max_json_schema_depth", "max_regex_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.rate_limit_per_minute >= 0:  # NaN too
            raise ValueError(f"rate_limit_per_minute must be >= 0, got {self.rate_limit_per_minute}")
        if self.rate_limit_burst is not None and self.rate_limit_burst < 1:
            raise ValueError(f"rate_limit_burst must be >= 1, got {self.rate_limit_burst}")
        self.api_key = tuple(self.api_key)
        if any(not key.strip() for key in self.api_key):
            raise ValueError("an API key must not be empty")
        if self.api_keys_file is not None:
            self.api_keys_file = Path(self.api_keys_file)


def _flag_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"{raw!r} is not a boolean (use true or false)")
    return lowered in ("1", "true", "yes")


# flag name -> (environment variable, type); shared by the CLI so a flag and its variable cannot drift apart
FLAG_ENV: dict[str, tuple[str, Callable[[str], object]]] = {
    "model_id": ("MODEL_ID", str),
    "revision": ("REVISION", str),
    "dtype": ("DTYPE", str),
    "device": ("DEVICE", str),
    "quantize": ("QUANTIZE", str),
    "max_input_length": ("MAX_INPUT_LENGTH", int),
    "max_total_tokens": ("MAX_TOTAL_TOKENS", int),
    "max_batch_prefill_tokens": ("MAX_BATCH_PREFILL_TOKENS", int),
    "max_batch_total_tokens": ("MAX_BATCH_TOTAL_TOKENS", int),
    "max_running_requests": ("MAX_RUNNING_REQUESTS", int),
    "kv_cache_memory": ("KV_CACHE_MEMORY", int),
    "block_size": ("BLOCK_SIZE", int),
    "max_active_adapters": ("MAX_ACTIVE_ADAPTERS", int),
    "max_lora_rank": ("MAX_LORA_RANK", int),
    "adapter_device_memory": ("ADAPTER_DEVICE_MEMORY", int),
    "adapter_memory": ("ADAPTER_MEMORY", int),
    "adapter_source": ("ADAPTER_SOURCE", str),
    "lora_modules": ("LORA_MODULES", lambda raw: tuple(raw.split())),
    "adapter_root": ("ADAPTER_ROOT", lambda raw: tuple(Path(p) for p in raw.split(os.pathsep) if p)),
    "allowed_s3_buckets": ("ALLOWED_S3_BUCKETS", lambda raw: tuple(b.strip() for b in raw.split(",") if b.strip())),
    "allowed_hub_orgs": ("ALLOWED_HUB_ORGS", lambda raw: tuple(o.strip() for o in raw.split(",") if o.strip())),
    "max_adapter_bytes": ("MAX_ADAPTER_BYTES", int),
    "allow_pickle_adapters": ("ALLOW_PICKLE_ADAPTERS", _flag_bool),
    "adapter_download_timeout": ("ADAPTER_DOWNLOAD_TIMEOUT", float),
    "max_request_seconds": ("MAX_REQUEST_SECONDS", float),
    "adapter_uses_server_token": ("LORAX_USE_GLOBAL_HF_TOKEN", _flag_bool),
    "hostname": ("LORASERVE_HOSTNAME", str),
    "port": ("PORT", int),
    "max_concurrent_requests": ("MAX_CONCURRENT_REQUESTS", int),
    "otlp_endpoint": ("OTLP_ENDPOINT", str),
    "api_key": ("LORASERVE_API_KEY", lambda raw: tuple(k.strip() for k in raw.split(",") if k.strip())),
    "api_keys_file": ("LORASERVE_API_KEYS_FILE", Path),
    "metrics_require_key": ("LORASERVE_METRICS_REQUIRE_KEY", _flag_bool),
    "shutdown_timeout": ("SHUTDOWN_TIMEOUT", float),
    "stream_idle_timeout": ("STREAM_IDLE_TIMEOUT", float),
    "max_request_bytes": ("MAX_REQUEST_BYTES", int),
    "ray_replicas": ("RAY_REPLICAS", int),
    "ray_autoscaling_config": ("RAY_AUTOSCALING_CONFIG", json.loads),
    "max_stop_sequences": ("MAX_STOP_SEQUENCES", int),
    "max_stop_sequence_length": ("MAX_STOP_SEQUENCE_LENGTH", int),
    "max_best_of": ("MAX_BEST_OF", int),
    "max_n": ("MAX_N", int),
    "max_merged_adapters": ("MAX_MERGED_ADAPTERS", int),
    "max_json_schema_bytes": ("MAX_JSON_SCHEMA_BYTES", int),
    "max_json_schema_depth": ("MAX_JSON_SCHEMA_DEPTH", int),
    "max_regex_length": ("MAX_REGEX_LENGTH", int),
    "rate_limit_per_minute": ("RATE_LIMIT_PER_MINUTE", float),
    "rate_limit_burst": ("RATE_LIMIT_BURST", int),
}


def env_default(flag: str) -> object | None:
    """The value of `flag`'s environment variable, converted, or None when unset."""
    name, kind = FLAG_ENV[flag]
    raw = _env(name)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError as error:
        raise ValueError(f"environment variable {name}={raw!r} is not valid: {error}") from error
