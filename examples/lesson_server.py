"""Lesson 7, the course's LoRAX notebook on loraserve: the lorax-client against a local server, three task adapters
beside the base model.

In order: `generate` on the base model; `generate_stream` with its time to first token; two base-model streams at
once through `AsyncClient`; each task adapter streamed alone, next to the base model on the same prompt; the three
adapters and the base model streamed concurrently, their tokens interleaved in colour as the server batches them;
and a pydantic model's JSON schema constraining the extraction adapter's output, validated back into the model.

The course met two failures on its paid endpoint, and neither can happen here:
- lorax-client's 60 s read timeout ran out while the endpoint's model woke up. Here nothing is sent until
  GET /health answers 200 (the server answers 503 while it loads), so every request meets a loaded model and the
  client's own timeout is never approached.
- The Hub answered 401 for the adapters until a Hub token was passed by hand as `api_token`. Here the adapters are
  folders on this machine, sent as `adapter_source="local"`: the server reads them from disk, no request carries a
  token, and the server this program starts runs with HF_HUB_OFFLINE=1.

    .venv/bin/python examples/lesson_server.py              # starts `loraserve serve` itself, stops it at the end
    .venv/bin/python examples/lesson_server.py --url http://127.0.0.1:3000   # a server already running (its model)
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from common import EXAMPLES, markdown_table, parse, parser, save_plot
from lesson_data import TASKS, Entities, Example, parse_entities, split
from lorax import AsyncClient, Client

from loraserve.client import APITimeoutError
from loraserve.client import Client as ReadinessClient

BASE_PROMPT = "What is deep learning?"
EXTRACTION_TASK = "entities"
STRUCTURED_TOKENS = 256  # room for any answer of the lesson's data several times over
TITLES = {"style": "telegram-style completion", "summary": "one-sentence summary", "entities": "entity extraction"}
COLOURS = ("31", "34", "32", "35")  # ANSI red, blue, green, magenta: one per concurrent stream
PLOT_COLOURS = ("tab:red", "tab:blue", "tab:green", "m")  # the same, in the plot

def colour(text: str, stream: int) -> str:
    return f"\x1b[{COLOURS[stream % len(COLOURS)]}m{text}\x1b[0m"


def heldout_example(task: str) -> Example:
    """The first held-out example of the lesson's data: a prompt the adapters never saw in training."""
    _, heldout = split(task, 0, 1)
    return heldout[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def local_server(args: Any) -> Iterator[str]:
    """`loraserve serve` on a free loopback port, offline, until the block ends; yields its URL once it is ready."""
    port = free_port()
    command = [sys.executable, "-m", "loraserve.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port),
               "--dtype", args.dtype, *(["--model-id", args.model] if args.model else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.NamedTemporaryFile(prefix="loraserve-lesson-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    print(f"started: {' '.join(command[1:])} (log {log.name})")
    try:
        wait_until_ready(url, process, Path(log.name), args.ready_timeout)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    Path(log.name).unlink()  # reached only when the run succeeded: after a failure the log stays to be read


def wait_until_ready(url: str, process: subprocess.Popen | None, log: Path | None, timeout: float) -> float:
    """Poll GET /health until it answers 200, returning the seconds it took; fails early if the server exits."""
    start = time.perf_counter()
    with ReadinessClient(url) as probe:
        while True:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                probe.wait_until_ready(timeout=2.0)
                break
            except APITimeoutError:
                if time.perf_counter() - start > timeout:
                    raise
    seconds = time.perf_counter() - start
    print(f"GET /health answered 200 after {seconds:.1f} s; only now is the first request sent")
    return seconds


def stream(client: Client, prompt: str, **parameters: Any) -> tuple[str, list[float]]:
    """The course's loop: print each token as it comes, and time each one from the one before."""
    durations, text = [], []
    last = time.perf_counter()
    for response in client.generate_stream(prompt, **parameters):
        durations.append(time.perf_counter() - last)
        if not response.token.special:
            text.append(response.token.text)
            print(response.token.text, end="", flush=True)
        last = time.perf_counter()
    print()
    return "".join(text), durations


def stream_figures(durations: list[float]) -> dict[str, float]:
    decode = durations[1:]
    return {"ttft_s": durations[0], "tok_s": len(decode) / sum(decode) if decode else 0.0}


async def concurrent(url: str, jobs: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """Stream every (label, prompt, parameters) job at once through one AsyncClient, printing each token in its
    job's colour the moment it arrives."""
    client = AsyncClient(url)
    order: list[int] = []
    arrivals: list[list[float]] = [[] for _ in jobs]
    start = time.perf_counter()

    async def one(index: int, prompt: str, parameters: dict[str, Any]) -> None:
        async for response in client.generate_stream(prompt, **parameters):
            arrivals[index].append(time.perf_counter() - start)
            order.append(index)
            if not response.token.special:
                print(colour(response.token.text, index), end="", flush=True)

    await asyncio.gather(*(one(i, prompt, parameters) for i, (_, prompt, parameters) in enumerate(jobs)))
    print()
    return {"order": order, "arrivals": arrivals, "total_s": time.perf_counter() - start,
            "switches": sum(a != b for a, b in zip(order, order[1:]))}


def show(title: str) -> None:
    print(f"\n=== {title}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    flags = parser(__doc__.splitlines()[0])
    flags.add_argument("--url", help="a running loraserve server on this machine (it reads the adapter folders); "
                                     "default: start one for this run")
    flags.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /health")
    flags.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer (default 64; --quick 12)")
    flags.add_argument("--ignore-eos", action="store_true",
                       help="always generate --max-new-tokens (random test models may end at once otherwise)")
    for task in TASKS:
        flags.add_argument(f"--{task}-adapter", type=Path, default=EXAMPLES / "adapters" / task,
                           help=f"PEFT adapter folder for {TITLES[task]} (default examples/adapters/{task})")
        flags.add_argument(f"--{task}-prompt", default=None,
                           help=f"prompt for {TITLES[task]} (default: a held-out example of examples/lesson_data.py)")
    args = parse(flags, argv)
    tokens = args.max_new_tokens or (12 if args.quick else 64)
    adapters = {task: getattr(args, f"{task}_adapter").resolve() for task in TASKS}
    for task, folder in adapters.items():
        if not (folder / "adapter_config.json").is_file():
            flags.error(f"no PEFT adapter at {folder}: train it with examples/train_adapters.py or pass "
                        f"--{task}-adapter")
    examples = {task: heldout_example(task) for task in TASKS}
    prompts = {task: getattr(args, f"{task}_prompt") or examples[task].prompt for task in TASKS}
    options = {"max_new_tokens": tokens, "ignore_eos_token": args.ignore_eos}

    if args.url:
        wait_until_ready(args.url, None, None, args.ready_timeout)
        return lesson(args.url, args, adapters, prompts, examples, options)
    with local_server(args) as url:
        return lesson(url, args, adapters, prompts, examples, options)


def lesson(url: str, args: Any, adapters: dict[str, Path], prompts: dict[str, str], examples: dict[str, Example],
           options: dict[str, Any]) -> dict[str, Any]:
    client = Client(url)
    print(f"lorax-client keeps its default {client.timeout} s timeout: the model is loaded before the first request")
    figures: dict[str, Any] = {"plots": []}

    show(f"generate, base model: {BASE_PROMPT!r}")
    start = time.perf_counter()
    response = client.generate(BASE_PROMPT, **options)
    figures["generate_s"] = time.perf_counter() - start
    print(response.generated_text)
    print(f"request duration: {figures['generate_s']:.2f} s ({response.details.generated_tokens} tokens)")

    show("generate_stream, base model: tokens as they are decoded")
    figures["base_text"], durations = stream(client, BASE_PROMPT, **options)
    figures["stream"] = stream_figures(durations)
    print(f"time to first token: {figures['stream']['ttft_s']:.3f} s; then {figures['stream']['tok_s']:.1f} tok/s")
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([d * 1e3 for d in durations], marker=".")
    axes.set(xlabel="token", ylabel="ms since the previous token", title="generate_stream: prefill, then decode")
    figures["plots"].append(str(save_plot(figure, args.plots_dir, "lesson_server_stream")))

    show("AsyncClient: two base-model streams at once, one long, one short")
    short = max(1, options["max_new_tokens"] // 4)
    both = asyncio.run(concurrent(url, [("long", BASE_PROMPT, options),
                                      ("short", BASE_PROMPT, {**options, "max_new_tokens": short})]))
    print(f"total {both['total_s']:.2f} s; the short stream ended after {both['arrivals'][1][-1]:.2f} s, "
          f"the long one after {both['arrivals'][0][-1]:.2f} s")
    figures["two_streams"] = {key: both[key] for key in ("total_s", "switches")}

    figures["tasks"] = {}
    for task in TASKS:
        show(f"adapter {task} ({TITLES[task]}), alone, adapter_source=local, no api_token")
        print(f"prompt: {prompts[task]}")
        text, durations = stream(client, prompts[task], adapter_id=str(adapters[task]), adapter_source="local",
                                 **options)
        base = client.generate(prompts[task], **options).generated_text
        print(f"base model, same prompt: {base}")
        figures["tasks"][task] = {"text": text, "base_text": base, **stream_figures(durations)}
        print(f"time to first token: {figures['tasks'][task]['ttft_s']:.3f} s (with reading the adapter from disk, "
              f"the first time the server sees it); then {figures['tasks'][task]['tok_s']:.1f} tok/s")

    show("AsyncClient: the three adapters and the base model at once, one colour each")
    jobs = [(task, prompts[task], {"adapter_id": str(adapters[task]), "adapter_source": "local", **options})
            for task in TASKS] + [("base", prompts[TASKS[0]], options)]
    print("  ".join(colour(label, i) for i, (label, _, _) in enumerate(jobs)))
    together = asyncio.run(concurrent(url, jobs))
    print(markdown_table(["stream", "time to first token s", "tokens", "done after s"],
                         [[label, f"{times[0]:.3f}", len(times), f"{times[-1]:.2f}"]
                          for (label, _, _), times in zip(jobs, together["arrivals"])]))
    print(f"total {together['total_s']:.2f} s for all four; the stream changed {together['switches']} times between "
          f"consecutive tokens (one after another would change {len(jobs) - 1} times)")
    figures["concurrent"] = {"labels": [label for label, _, _ in jobs], "switches": together["switches"],
                             "total_s": together["total_s"], "order": together["order"],
                             "ttft_s": [times[0] for times in together["arrivals"]]}
    figure, axes = plt.subplots(figsize=(7, 3))
    for i, times in enumerate(together["arrivals"]):
        axes.scatter(times, [i] * len(times), s=12, color=PLOT_COLOURS[i % len(PLOT_COLOURS)])
    axes.set(xlabel="seconds since the four requests were sent", yticks=range(len(jobs)),
             yticklabels=[label for label, _, _ in jobs], title="Four streams, one batch: token arrivals")
    figures["plots"].append(str(save_plot(figure, args.plots_dir, "lesson_server_concurrent")))

    example = examples[EXTRACTION_TASK]
    reference = example if prompts[EXTRACTION_TASK] == example.prompt else None
    figures["structured"] = structured(client, adapters[EXTRACTION_TASK], prompts[EXTRACTION_TASK],
                                       figures["tasks"][EXTRACTION_TASK]["text"], reference)
    return figures


def structured(client: Client, adapter: Path, prompt: str, own_answer: str,
               reference: Example | None) -> dict[str, Any]:
    """The extraction prompt with `Entities`' JSON schema as its response_format, on the base model and on the
    adapter; beside them the adapter's unconstrained answer, which it was trained to write as that JSON, parsed the
    same way. Each is scored against the lesson data's answer when the prompt is the lesson's."""
    show(f"response_format: {Entities.__name__}'s JSON schema, base model and {EXTRACTION_TASK} adapter")
    response_format = {"type": "json_object", "schema": Entities.model_json_schema()}
    found: dict[str, set[tuple[str, str]]] = {}
    results: dict[str, Any] = {}
    for label, parameters in (("base", {}), ("adapter", {"adapter_id": str(adapter), "adapter_source": "local"})):
        response = client.generate(prompt, response_format=response_format, max_new_tokens=STRUCTURED_TOKENS,
                                   **parameters)
        text = response.generated_text
        if response.details.finish_reason == "length":
            # the schema decides what may be written, not when writing stops: an answer cut off is not yet JSON
            print(f"{label}, schema-constrained: did not finish within {STRUCTURED_TOKENS} tokens: {text[:120]!r}")
            results[label], found[label] = None, set()
            continue
        entities = Entities.model_validate_json(text)  # a finished answer is the schema's JSON
        print(f"{label}, schema-constrained: {text}\n  -> {entities!r}")
        results[label] = entities.model_dump()
        found[label] = parse_entities(text)
    answer = next(iter(own_answer.strip().splitlines()), "")  # the answer; a base model rambles on after it
    found["adapter_unconstrained"] = parse_entities(answer)
    results["adapter_unconstrained"] = answer
    print(f"adapter, unconstrained: {answer[:120]!r} ({'parses' if found['adapter_unconstrained'] else 'no entities'})")
    if reference is not None:
        expected = parse_entities(reference.target)
        results["expected"] = len(expected)
        print(f"reference: {reference.target.strip()} ({len(expected)} entities)")
        for label, names in found.items():
            results[f"{label}_hits"] = len(names & expected)
            print(f"  {label}: {len(names & expected)} of {len(expected)} found, {len(names - expected)} wrong")
    return results


if __name__ == "__main__":
    main()
