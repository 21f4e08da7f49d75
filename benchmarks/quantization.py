"""Weight-only int8/int4 against fp32 and bf16 on the default model (Gemma 3 270M): memory, speed and quality.

Each configuration runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. Per configuration: bytes of
the linear layers' weights (decoder projections and lm_head apart), RSS after load and peak RSS before the
perplexity pass, RSS after decoding, decode tokens/s at 1 and 32 concurrent requests, perplexity on
benchmarks/data/perplexity.txt (512-token windows) and greedy agreement with fp32 on a few prompts, and int4
group sizes 32/64/128 requantized from the fp32 model.
Under int4 the GGUF's Q4_K tensors are taken as they are and the k/v projections get int8 (engine/loading.py); the
group sweep instead requantizes every decoder linear from the fp32 model's floats.
Prints a markdown section and puts it in benchmarks/RESULTS.md in place of the previous run's.

    .venv/bin/python benchmarks/quantization.py
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_file import machine, replace_section
from weights import linear_bytes

from loraserve import kernels
from loraserve.config import EngineConfig
from loraserve.engine.engine import Engine
from loraserve.engine.llm import LLM
from loraserve.layers.linear import Linear
from loraserve.models.default_model import default_model_path
from loraserve.quant.formats import INT4_GROUP
from loraserve.quant.int4 import Int4Weight
from loraserve.sampling.params import SamplingParams

HERE = Path(__file__).parent
HEADING = "## Weight-only quantization, default model"
NEW_TOKENS = 32
WINDOW = 512  # tokens per perplexity window (each starts with BOS and has its own context)
PROMPTS = [f"Write a short paragraph about {topic}." for topic in (
    "the history of the printing press", "how vaccines train the immune system", "why the sky is blue",
    "the rules of chess", "how a compiler works", "the water cycle", "the life of honeybees", "black holes")]
AGREEMENT_PROMPTS = ["The capital of France is", "Here is a recipe for pancakes:", "def fibonacci(n):",
                     "The three laws of thermodynamics are"]
GROUP_SWEEP = "int4 groups (fp32 model)"
CONFIGS = {  # name -> (dtype, quantize, variants measured in the same process)
    "fp32": ("float32", None, []),
    "bf16": ("bfloat16", None, []),
    "int8": ("bfloat16", "int8", []),
    "int4": ("bfloat16", "int4", []),
    GROUP_SWEEP: ("float32", None, ["g32", "g64", "g128"]),
}


def engine_config(dtype: str, quantize: str | None) -> EngineConfig:
    # the server's default KV budget: on the CPU its pages become resident only as requests fill them
    return EngineConfig(dtype=dtype, quantize=quantize, max_running_requests=32, max_batch_prefill_tokens=256)


def current_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def decode_rate(engine: Engine, concurrency: int) -> float:
    """Output tokens/s of the steps after every request has its first token (prefill excluded)."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, chosen_logprob=False)
    for prompt in (PROMPTS * 4)[:concurrency]:
        engine.add(engine.make_request(prompt, params))
    started: set[str] = set()
    window_start, tokens = None, 0
    while engine.has_work():
        outputs = engine.step()
        now = time.perf_counter()
        if window_start is not None:
            tokens += sum(len(o.tokens) for o in outputs)
        started.update(o.request_id for o in outputs)
        if window_start is None and len(started) == concurrency:
            window_start = now
    return tokens / (time.perf_counter() - window_start)


def perplexity(llm: LLM) -> float:
    ids = llm.engine.tokenizer.encode((HERE / "data" / "perplexity.txt").read_text())
    bos, body = ids[:1], ids[1:]
    windows = [bos + body[i : i + WINDOW - 1] for i in range(0, len(body), WINDOW - 1)]
    results = llm.generate(windows, SamplingParams(max_new_tokens=1, prompt_logprobs=0))
    logprobs = [entry[1] for result in results for entry in result.prompt_logprobs]
    return math.exp(-sum(logprobs) / len(logprobs))


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return [result.token_ids for result in llm.generate(AGREEMENT_PROMPTS, params)]


def measure(llm: LLM, timed: bool) -> dict:
    engine = llm.engine
    result: dict = {"bytes": linear_bytes(engine)}
    if timed:
        decode_rate(engine, 2)  # warm-up
        result["tok_s_1"] = decode_rate(engine, 1)
        result["tok_s_32"] = decode_rate(engine, 32)
        result["rss_after_decode"] = current_rss()
        result["peak_rss_before_ppl"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["greedy"] = greedy(llm)
    result["perplexity"] = perplexity(llm)
    return result


def worker(name: str) -> dict:
    dtype, quantize, variants = CONFIGS[name]
    start = time.perf_counter()
    llm = LLM(engine_config(dtype, quantize))
    gc.collect()
    out: dict = {"load_s": time.perf_counter() - start, "rss_after_load": current_rss(),
                 "threads": torch.get_num_threads()}
    model = llm.engine.core.runner.model
    if name == GROUP_SWEEP:  # fp32 keeps plain weights to requantize from; the kernels still run in bf16
        originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                     if isinstance(m, Linear) and n != "lm_head"}
    else:
        out["base"] = measure(llm, timed=True)
    for variant in variants:
        for module_name, weight in originals.items():
            model.get_submodule(module_name).quantized = Int4Weight.quantize(weight, int(variant[1:]))
        out[variant] = measure(llm, timed=False)
    return out



def int8_kernels() -> str:
    module = kernels.extension()
    return module.int8_isa() if module is not None else f"not built: {kernels.why_unavailable()}"


def run_worker(name: str, threads: int) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--worker", name, "--threads", str(threads)],
                               stdout=subprocess.PIPE, text=True, timeout=300, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of tokens before each sequence's first difference, share of positions equal)."""
    prefix = same = total = 0
    for ours, theirs in zip(tokens, reference):
        total += len(theirs)
        same += sum(a == b for a, b in zip(ours, theirs))
        prefix += next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(theirs))
    return prefix / total, same / total


def table(results: dict[str, dict]) -> list[str]:
    bf16, fp32 = results["bf16"]["base"], results["fp32"]["base"]
    rows = [("fp32", "fp32", "base"), ("bf16", "bf16", "base"), ("int8 (lm_head and table w8a8)", "int8", "base"),
            (f"int4 g{INT4_GROUP}, k/v int8 (lm_head and table w8a8)", "int4", "base"),
            *((f"int4 {g}, all requantized (fp32 model, untimed)", GROUP_SWEEP, g) for g in ("g32", "g64", "g128"))]
    lines = ["| config | decoder linears MB | x bf16 | lm_head MB | RSS after load MB | x bf16 | RSS after decode MB | "
             "x bf16 | peak RSS MB | decode tok/s b=1 | x bf16 | decode tok/s b=32 | x bf16 | perplexity | vs bf16 | "
             "vs fp32 | greedy = fp32 (prefix / positions) |", "|" + "---|" * 17]
    for label, config, variant in rows:
        r, process = results[config][variant], results[config]
        decoder_mb, head_mb = r["bytes"]["decoder"] / 1e6, r["bytes"]["lm_head"] / 1e6
        prefix, same = agreement(r["greedy"], fp32["greedy"])
        timed = "tok_s_1" in r
        cells = [label, f"{decoder_mb:.1f}", f"{r['bytes']['decoder'] / bf16['bytes']['decoder']:.2f}",
                 f"{head_mb:.1f}",
                 f"{process['rss_after_load'] / 1e6:.0f}" if variant == "base" else "-",
                 f"{process['rss_after_load'] / results['bf16']['rss_after_load']:.2f}" if variant == "base" else "-",
                 f"{r['rss_after_decode'] / 1e6:.0f}" if timed else "-",
                 f"{r['rss_after_decode'] / bf16['rss_after_decode']:.2f}" if timed else "-",
                 f"{r['peak_rss_before_ppl'] / 1e6:.0f}" if variant == "base" else "-",
                 f"{r['tok_s_1']:.1f}" if timed else "-", f"{r['tok_s_1'] / bf16['tok_s_1']:.2f}" if timed else "-",
                 f"{r['tok_s_32']:.1f}" if timed else "-",
                 f"{r['tok_s_32'] / bf16['tok_s_32']:.2f}" if timed else "-",
                 f"{r['perplexity']:.3f}", f"{(r['perplexity'] / bf16['perplexity'] - 1) * 100:+.2f}%",
                 f"{(r['perplexity'] / fp32['perplexity'] - 1) * 100:+.2f}%", f"{prefix:.2f} / {same:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def aims(results: dict[str, dict]) -> list[str]:
    bf16, int8, int4 = results["bf16"]["base"], results["int8"]["base"], results["int4"]["base"]

    def check(label: str, value: float, limit: float, at_most: bool) -> str:
        met = value <= limit if at_most else value >= limit
        return f"- {label}: {value:.3f} ({'<=' if at_most else '>='} {limit}): {'met' if met else 'NOT met'}"

    return [
        check("int8 decoder weight bytes / bf16", int8["bytes"]["decoder"] / bf16["bytes"]["decoder"], 0.55, True),
        check("int8 perplexity increase vs bf16 (%)", (int8["perplexity"] / bf16["perplexity"] - 1) * 100, 1, True),
        check("int8 single-stream decode / bf16", int8["tok_s_1"] / bf16["tok_s_1"], 1.5, False),
        check("int4 single-stream decode / bf16", int4["tok_s_1"] / bf16["tok_s_1"], 1.8, False),
        check("int8 decode at 32 requests / bf16", int8["tok_s_32"] / bf16["tok_s_32"], 1.0, False),
        check("int4 decode at 32 requests / bf16", int4["tok_s_32"] / bf16["tok_s_32"], 1.0, False),
        check("int8 RSS after decode / bf16", int8["rss_after_decode"] / bf16["rss_after_decode"], 0.75, True),
        check("int4 RSS after decode / bf16", int4["rss_after_decode"] / bf16["rss_after_decode"], 0.6, True),
        check("int4 decoder weight bytes / bf16", int4["bytes"]["decoder"] / bf16["bytes"]["decoder"], 0.3, True),
        check("int4 perplexity increase vs bf16 (%)", (int4["perplexity"] / bf16["perplexity"] - 1) * 100, 5, True),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    # 1 by default: on a shared 2-core machine a second OpenMP thread waiting on a busy core made every matmul ~30x
    # slower (measured: 2048x640 at one row, 0.1-0.2 ms with 1 thread, 6.5 ms with 2 while another job ran)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker)))
        return
    default_model_path(EngineConfig().cache_dir)  # assemble once, outside the measured processes
    load_before = os.getloadavg()
    results = {}
    for name in CONFIGS:
        results[name] = run_worker(name, args.threads)
        print(f"{name}: done", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    lines = [
        f"{HEADING} ({datetime.datetime.now().isoformat(timespec='minutes')})",
        "",
        f"- Machine: {machine()}, {results['bf16']['threads']} torch threads; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (other work on the machine skews speeds)",
        f"- Command: `.venv/bin/python benchmarks/quantization.py --threads {args.threads}` (each configuration in "
        "its own process)",
        f"- Decode: {NEW_TOKENS} new tokens per request, greedy, EOS ignored, tokens/s of the steps after every "
        f"request's prefill. Perplexity: benchmarks/data/perplexity.txt in {WINDOW}-token windows. Greedy "
        f"agreement: {len(AGREEMENT_PROMPTS)} prompts x {NEW_TOKENS} tokens against fp32.",
        "- Memory: decoder linears = the 18 layers' q/k/v/o/gate/up/down as stored for the matmul (bf16: oneDNN "
        "packed); lm_head = the tied 262k x 640 head as stored for the matmul (bf16: a packed copy beside the plain "
        "embedding table; quantized: int8 codes that also serve the embedding lookups, the only copy). RSS with "
        "the server's default 1 GiB KV budget, whose pages become resident as requests fill them: after load, and "
        "after the timed decode runs (a warm server). The peak is set while loading the GGUF (float weights before "
        "quantization).",
        "- int4: the GGUF's Q4_K tensors (every o_proj, half the down_proj) keep their own codes, k/v projections "
        "are requantized to int8, the rest to int4 (min-max, then least-squares steps); the group sweep requantizes "
        "every decoder linear to int4.",
        "- lm_head under --quantize: int8 weights times int8 activations with one scale per token (w8a8), on "
        f"loraserve's int8 op ({int8_kernels()}); the decoder linears stay weight-only (int8: the same op with "
        "fp32 activations; int4: torch's kernel). The byte aims count the decoder linears' bytes.",
        "",
        *table(results),
        "",
        "Aims:",
        *aims(results),
        "",
    ]
    print("\n".join(lines))
    replace_section(HEADING, lines)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "quantization.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
