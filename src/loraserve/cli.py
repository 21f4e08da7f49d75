"""`loraserve serve` and `loraserve generate`: flags (or their environment variables) -> config -> wired parts."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from loraserve.config import FLAG_ENV, EngineConfig, ServerConfig, env_default
from loraserve.engine.engine import Engine
from loraserve.errors import LoraserveError
from loraserve.sampling.params import SamplingParams

_ENGINE_FLAGS = {
    "model_id": "HF folder, Hub id or .gguf file (default: the bundled Gemma 3 270M)",
    "revision": "Hub revision of the model",
    "dtype": "auto | float32 | bfloat16 | float16",
    "device": "auto | cpu | cuda",
    "quantize": "int8 | int4: weight-only quantization of the linear layers; k/v projections int8 under int4; "
                "lm_head int8 with per-token int8 activations (default: none)",
    "max_input_length": "longest prompt in tokens",
    "max_total_tokens": "prompt + generated tokens per request",
    "max_batch_prefill_tokens": "tokens computed per step (prefill chunks plus decodes)",
    "max_batch_total_tokens": "KV cache capacity in tokens (default: from --kv-cache-memory)",
    "max_running_requests": "sequences decoded together",
    "kv_cache_memory": "bytes for the KV cache",
    "block_size": "tokens per KV block",
    "max_active_adapters": "adapters resident in the model's LoRA layers at once (0 disables LoRA)",
    "max_lora_rank": "refuse adapters of a larger rank (default: any rank)",
    "adapter_device_memory": "bytes of adapter weights in the model's LoRA layers at once (default 1 GiB)",
    "adapter_memory": "bytes of adapters kept in host memory beyond the device tier",
    "adapter_source": "hub | local | s3: the source of adapters a request names without one (default hub)",
    "adapter_root": "local adapters resolve inside this folder only (repeatable; env: os.pathsep-separated); "
                    "default: local folders anywhere",
    "allowed_s3_buckets": "S3 buckets adapters may come from (repeatable; env: comma-separated); default: all",
    "allowed_hub_orgs": "Hub users/organisations adapters may come from (repeatable; env: comma-separated)",
    "max_adapter_bytes": "largest adapter accepted, in bytes (default 4 GiB)",
    "allow_pickle_adapters": "true: read adapter_model.bin (weights_only) when there is no safetensors file",
    "adapter_download_timeout": "seconds a request waits for its adapter's download (Hub or S3) or read before "
                                "it fails with 424; a stalled download fails only the requests for that adapter "
                                "(default 120)",
    "max_request_seconds": "the longest a request may run, queueing and adapter loading included: its "
                           "`request_timeout` is capped to it, and a request without one gets it; past it the "
                           "request is aborted with 504 (default 600)",
    "lora_modules": "adapters registered by name at start: NAME=PATH (at --adapter-source) or "
                    '\'{"name": ..., "path": ..., "source": ...}\' (repeatable, space-separated)',
    "adapter_uses_server_token": "true: adapter downloads without a token of their own use the server's HF_TOKEN",
}
_SERVER_FLAGS = {
    "hostname": "address to bind (default 127.0.0.1)",
    "port": "port to bind (default 3000)",
    "max_concurrent_requests": "requests in flight before answering 429",
    "otlp_endpoint": "OTLP/HTTP collector URL (e.g. http://collector:4318): export a trace per request",
    "api_key": "an API key callers must send as Authorization: Bearer (repeatable; env: comma-separated)",
    "api_keys_file": "JSON file of keys with their tenant and the adapters/sources each may use",
    "metrics_require_key": "true: /metrics needs an API key too (default: open to scrapers)",
    "max_request_bytes": "larger request bodies answer 413 (default 8 MiB)",
    "stream_idle_timeout": "seconds a response may wait on a client that reads nothing (a send blocked on it) "
                           "before the response is ended and its request aborted (default 60)",
    "ray_replicas": "serve through Ray Serve with N engine replicas and adapter-affinity routing (RAY_ADDRESS joins "
                    "a cluster; default 0: one process)",
    "ray_autoscaling_config": "Ray Serve autoscaling_config as JSON, instead of a fixed --ray-replicas",
    "shutdown_timeout": "seconds SIGTERM lets accepted requests finish (503 to new ones) before ending them "
                        "with an error (default 30)",
    "max_stop_sequences": "stop sequences per request (default 4, as LoRAX)",
    "max_stop_sequence_length": "characters per stop sequence (default 256)",
    "max_best_of": "largest LoRAX `best_of`: sequences sampled to return the likeliest (default 2, as LoRAX)",
    "max_n": "largest OpenAI `n`: choices per request (default 16)",
    "max_merged_adapters": "adapters one `merged_adapters` request may merge (default 32)",
    "max_json_schema_bytes": "largest JSON schema of a constrained request, as compact JSON (default 65536)",
    "max_json_schema_depth": "deepest nesting of objects and arrays in that schema (default 64)",
    "max_regex_length": "longest regex of a constrained request, in characters (default 4096)",
    "rate_limit_per_minute": "requests per minute per tenant (per client address without API keys); over it 429 "
                             "with Retry-After (default 0: no limit)",
    "rate_limit_burst": "requests a caller may send at once before the rate applies (default: a minute's worth)",
}


_LIST_FLAGS = {"lora_modules", "api_key", "adapter_root", "allowed_s3_buckets", "allowed_hub_orgs"}  # take several values, as vLLM's flag does


def _add_flags(parser: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    for name, help_text in flags.items():
        env_name, kind = FLAG_ENV[name]
        flag = "--" + name.replace("_", "-")
        if name in _LIST_FLAGS:
            parser.add_argument(flag, dest=name, nargs="+", action="extend", default=None,
                                help=f"{help_text} [env {env_name}]")
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, help=f"{help_text} [env {env_name}]")


def _pick(args: argparse.Namespace, names: dict[str, str]) -> dict[str, object]:
    """Flag if given, else its environment variable, else the dataclass default."""
    values = {}
    for name in names:
        value = getattr(args, name)
        if value is None:
            value = env_default(name)
        if value is not None:
            values[name] = value
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description="Multi-LoRA LLM inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP server")
    _add_flags(serve, _ENGINE_FLAGS)
    _add_flags(serve, _SERVER_FLAGS)
    generate = commands.add_parser("generate", help="generate from a prompt, streaming to the terminal")
    generate.add_argument("prompt")
    _add_flags(generate, _ENGINE_FLAGS)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=None)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except LoraserveError as error:
        print(f"loraserve: error: {error}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    engine_config = EngineConfig(**_pick(args, _ENGINE_FLAGS))
    if args.command == "serve":
        server_config = ServerConfig(**_pick(args, _SERVER_FLAGS))
        if server_config.ray_replicas or server_config.ray_autoscaling_config:
            from loraserve.serving.ray_app import serve_with_ray

            serve_with_ray(engine_config, server_config, server_config.ray_replicas or 1,
                           server_config.ray_autoscaling_config)
            return 0
        from loraserve.server.app import serve

        serve(engine_config, server_config)
        return 0
    return _generate(args, engine_config)


def _generate(args: argparse.Namespace, config: EngineConfig) -> int:
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or [],
        chosen_logprob=False,  # the terminal shows text only
    )
    engine = Engine.from_config(config)
    engine.add(engine.make_request(args.prompt, params))
    while engine.has_work():
        for output in engine.step():
            sys.stdout.write(output.text)
            sys.stdout.flush()
            if output.finished:
                reason = output.finish_reason.value if output.finish_reason else "unknown"
                sys.stdout.write(f"\n[{output.generated_tokens} tokens, finish_reason={reason}]\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
