"""transformers + PEFT, in process: the natural CPU alternative to a serving engine. A simple continuous loop takes
every request that has arrived (up to a batch) and runs one mixed-adapter `generate` over them, PEFT's
`adapter_names=` giving each row its adapter; requests arriving meanwhile wait for the next batch. Every row of a
batch gets its first token when the batch does; a row's last token is the batch step of its own length."""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from importlib.metadata import version
from pathlib import Path

import torch

from benchmarks.serving.assets import hf_model_dir
from benchmarks.serving.client import RequestResult, progress
from benchmarks.serving.peers.base import Peer
from benchmarks.serving.workload import TimedRequest


class _StepClock:
    """A `generate` streamer that only notes when each new token (after the prompt) is produced."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.monotonic())
        self.prompt_seen = True

    def end(self) -> None:
        pass


class TransformersPeer(Peer):
    name = "transformers+peft"

    def version(self) -> str:
        return f"transformers {version('transformers')}, peft {version('peft')}, torch {torch.__version__}"

    def command(self) -> str:
        return (f"in process: AutoModelForCausalLM (bf16) + PeftModel, mixed-adapter generate(adapter_names=...), "
                f"batches of up to {self.slots} arrived requests, {self.loaded_limit} adapters loaded at most (LRU)")

    @property
    def loaded_limit(self) -> int:
        """PEFT keeps each loaded adapter as modules in the model: an LRU bounds them."""
        return 2 * self.slots

    def start(self, fleet: list[Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.fleet = fleet
        model_dir = hf_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        # the mixed-adapter path hands lm_head a strided view, which is about 2x slower (ecosystem.md section 10)
        base.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0].contiguous(),))
        self.model = PeftModel.from_pretrained(base, fleet[0], adapter_name=fleet[0].name) if fleet else base
        self.loaded: OrderedDict[str, None] = OrderedDict({fleet[0].name: None} if fleet else {})

    def stop(self) -> None:
        self.model = None  # frees the weights before the next peer starts

    def _ensure_loaded(self, names: set[str]) -> None:
        for name in names:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            while len(self.loaded) >= max(self.loaded_limit, len(names)):
                evicted = next(n for n in self.loaded if n not in names)
                self.model.delete_adapter(evicted)
                del self.loaded[evicted]
            self.model.load_adapter(self.fleet[int(name.rsplit("-", 1)[1])], adapter_name=name)
            self.loaded[name] = None

    def run(self, requests: list[TimedRequest], deadline_s: float) -> tuple[list[RequestResult], float]:
        start = time.monotonic()
        pending = sorted(requests, key=lambda r: r.arrival_s)
        results: dict[int, RequestResult] = {}
        while pending and time.monotonic() - start < deadline_s:
            now = time.monotonic() - start
            batch = [r for r in pending if r.arrival_s <= now][:self.slots]
            if not batch:
                time.sleep(min(0.05, pending[0].arrival_s - now))
                continue
            pending = [r for r in pending if r not in batch]
            for request, result in zip(batch, self._generate(batch, start)):
                results[request.index] = result
            progress(len(results), len(requests), start)
        sys.stderr.write("\n")
        wall = time.monotonic() - start
        return [results.get(r.index) or RequestResult(r.index, r.adapter, False, f"not done after {deadline_s:.0f} s")
                for r in requests], wall

    def _generate(self, batch: list[TimedRequest], start: float) -> list[RequestResult]:
        names = [self.fleet[r.adapter].name if r.adapter is not None else "__base__" for r in batch]
        self._ensure_loaded({n for n in names if n != "__base__"})
        inputs = self.tokenizer([r.prompt for r in batch], return_tensors="pt", padding=True)
        longest = max(r.output_tokens for r in batch)
        clock = _StepClock()
        extra = {"adapter_names": names} if self.fleet else {}
        with torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                streamer=clock, pad_token_id=self.tokenizer.pad_token_id, **extra)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [RequestResult(r.index, r.adapter, True, "", clock.times[0] - start - r.arrival_s,
                              clock.times[r.output_tokens - 1] - start - r.arrival_s, r.output_tokens, tokens)
                for r, tokens in zip(batch, prompt_tokens)]
