"""The synchronous text-level engine: tokenize and validate, step the core, detokenize, stop on strings.

Stop strings are checked here, in the same thread as the core, so a request that hits one is aborted before the next
step computes a token it would throw away. `AsyncEngine` and `LLM` both drive this class.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from loraserve.adapters.cache import HostAdapter
from loraserve.adapters.registry import AdapterKey
from loraserve.adapters.sources import AdapterSourcePolicy
from loraserve.config import EngineConfig, parse_lora_module
from loraserve.engine.block_manager import BlockManager
from loraserve.engine.core import CoreOutput, EngineCore
from loraserve.engine.detokenizer import IncrementalDetokenizer
from loraserve.engine.kv_cache import allocate_kv_cache, num_blocks_for_budget
from loraserve.engine.loading import LoadedModel, load
from loraserve.engine.request import AdapterRef, FinishReason, Request, RequestTimings
from loraserve.engine.residency import AdapterResidency, ResidencyLimits
from loraserve.engine.runner import ModelRunner
from loraserve.engine.scheduler import Scheduler, SchedulerLimits
from loraserve.engine.stats import AdapterCounters, EngineInfo, EngineStats, adapter_names
from loraserve.errors import ContextTooLong, InvalidRequest
from loraserve.sampling.grammar import GrammarCompiler
from loraserve.sampling.params import SamplingParams


@dataclass
class TokenInfo:
    id: int
    text: str  # the text this token released to the stream (may be "" while a character is incomplete)
    logprob: float | None  # None unless the request asked for it (SamplingParams.chosen_logprob)
    special: bool
    top_logprobs: list[tuple[int, str, float]] | None = None


@dataclass
class RequestOutput:
    """What one step produced for one request; the last one has `finished` set and the whole text."""

    request_id: str
    tokens: list[TokenInfo]
    text: str  # new text released this step
    prompt_tokens: int
    generated_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    generated_text: str | None = None  # the full text, on the last output only
    prompt_logprobs: list | None = None
    timings: RequestTimings | None = None  # on the last output only


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer
    prompt_logprobs: list = field(default_factory=list)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.config = config
        self.model_name = loaded.name
        self.tokenizer: PreTrainedTokenizerBase = loaded.tokenizer
        self.max_total_tokens = min(config.max_total_tokens, loaded.max_model_len)
        self.max_input_length = min(config.max_input_length, self.max_total_tokens - 1)
        layers = loaded.model.attention_layers()
        dtype, device = config.torch_dtype(), config.torch_device()
        if config.max_batch_total_tokens is not None:
            num_blocks = -(-config.max_batch_total_tokens // config.block_size)
        else:
            num_blocks = num_blocks_for_budget(layers, dtype, config.block_size, config.kv_cache_memory)
        if num_blocks * config.block_size < self.max_total_tokens:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens, fewer than max_total_tokens "
                f"({self.max_total_tokens}); raise kv_cache_memory or lower max_total_tokens"
            )
        allocate_kv_cache(layers, num_blocks, config.block_size, dtype, device)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.adapters = AdapterResidency(
            loaded.model,
            ResidencyLimits(config.adapter_device_memory, config.max_active_adapters, config.max_lora_rank,
                            config.adapter_memory, config.cache_dir / "adapters", config.s3_endpoint_url,
                            AdapterSourcePolicy(config.adapter_root, config.allowed_s3_buckets,
                                                config.allowed_hub_orgs, config.max_adapter_bytes,
                                                config.allow_pickle_adapters),
                            config.adapter_download_timeout),
            dtype, device,
        )
        for entry in config.lora_modules:
            module = parse_lora_module(entry, config.adapter_source)
            self.adapters.names.register(module.name, AdapterKey(module.source, module.path))
        scheduler = Scheduler(
            SchedulerLimits(config.max_batch_prefill_tokens, config.max_running_requests), self.block_manager,
            self.adapters,
        )
        runner = ModelRunner(loaded.model, config.block_size, device, config.seed)
        self.core = EngineCore(scheduler, runner, self.adapters, loaded.eos_token_ids)
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = loaded.model.config.vocab_size
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, loaded.eos_token_ids)
        self._special_ids = set(self.tokenizer.all_special_ids)
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        return cls(load(config), config)

    # -- what the outside may read --------------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        config, blocks = self.config, self.block_manager
        return EngineInfo(
            model_name=self.model_name, dtype=str(config.torch_dtype()), device_type=config.torch_device().type,
            max_input_length=self.max_input_length, max_total_tokens=self.max_total_tokens,
            kv_capacity_tokens=blocks.num_blocks * blocks.block_size, block_size=blocks.block_size,
            num_kv_blocks=blocks.num_blocks, max_running_requests=config.max_running_requests,
            lora_enabled=self.adapters.enabled, max_adapters=config.max_active_adapters,
            max_lora_rank=config.max_lora_rank, adapter_device_budget=config.adapter_device_memory,
            adapter_host_budget=config.adapter_memory, adapter_source=config.adapter_source,
        )

    def stats(self) -> EngineStats:
        """A snapshot, safe from any thread (see `engine.stats`)."""
        scheduler, adapters = self.core.scheduler, self.adapters
        host = adapters.host
        return EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_free_kv_blocks=self.block_manager.num_free_blocks, num_kv_blocks=self.block_manager.num_blocks,
            num_preemptions=scheduler.num_preemptions,
            running_adapters=adapter_names(list(scheduler.running)),
            waiting_adapters=adapter_names(list(scheduler.waiting)),
            adapters=AdapterCounters(host.loads, host.hits, host.evictions, adapters.device_loads,
                                     adapters.device_evictions, adapters.device_count, adapters.device_bytes,
                                     adapters.layer_bytes, host.nbytes, host.pinned, host.load_times()),
        )

    # -- requests -------------------------------------------------------------------------------------------------

    def make_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
        adapter: AdapterRef | None = None,
    ) -> Request:
        """Tokenize and validate; raises `InvalidRequest` / `ContextTooLong` before anything is queued."""
        params.validate()
        if adapter is not None:
            self.adapters.require_enabled()
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise InvalidRequest("`inputs` must not be empty")
        if not isinstance(prompt, str) and not all(0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequest(f"token ids must be in [0, {self.vocab_size}); the prompt holds one outside it")
        if len(token_ids) > self.max_input_length:
            raise ContextTooLong(
                f"`inputs` must have less than {self.max_input_length + 1} tokens (--max-input-length). "
                f"Given: {len(token_ids)}"
            )
        if params.max_new_tokens is None:
            params = dataclasses.replace(params, max_new_tokens=self.max_total_tokens - len(token_ids))
        if len(token_ids) + params.max_new_tokens > self.max_total_tokens:
            raise ContextTooLong(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens} (--max-total-tokens). "
                f"Given: {len(token_ids)} `inputs` tokens and {params.max_new_tokens} `max_new_tokens`"
            )
        return Request(
            request_id=request_id or f"req-{next(self._ids)}",
            prompt_token_ids=token_ids,
            params=params,
            max_total_tokens=self.max_total_tokens,
            adapter=adapter,
            grammar=self.grammars.new_state(params.grammar) if params.grammar is not None else None,
        )

    def add(self, request: Request, adapter: HostAdapter | None = None) -> None:
        """Queue a request made by `make_request`, with its adapter as `AdapterResidency.prepare` returned it (read
        now if not given: its errors raise here; `AsyncEngine` has already prepared it off the loop). The adapter is
        put on the device at admission."""
        if request.adapter is not None:
            if adapter is None:
                adapter = self.adapters.prepare(request.adapter)
                request.timings.adapter_ready = time.monotonic()
            self.adapters.pin(request, adapter)
        detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            request.prompt_token_ids,
            request.params.skip_special_tokens,
            request.params.stop,
            request.params.include_stop_in_output,
        )
        try:
            self.core.add_request(request)
        except Exception:
            self.adapters.finish(request)
            raise
        self._tracked[request.request_id] = _Tracked(request, detokenizer)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort and free at once; returns the final output, or None if the request was not in flight."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return None
        self.core.abort(request_id)
        return self._final(tracked, [], tracked.detokenizer.flush(), FinishReason.ABORTED)

    def has_work(self) -> bool:
        return self.core.has_work()

    # -- the loop -------------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        return [output for core_output in self.core.step() if (output := self._process(core_output)) is not None]

    def _process(self, core_output: CoreOutput) -> RequestOutput | None:
        request = core_output.request
        tracked = self._tracked.get(request.request_id)
        if tracked is None:
            return None
        now = time.monotonic()
        if request.timings.first_scheduled is None:
            request.timings.first_scheduled = now
        if core_output.prompt_logprobs:
            tracked.prompt_logprobs.extend(core_output.prompt_logprobs)
        sampled = core_output.new_token
        if sampled is None:
            return None
        if request.timings.first_token is None:
            request.timings.first_token = now
        text = tracked.detokenizer.push(sampled.token_id)
        token = TokenInfo(
            id=sampled.token_id,
            text=text,
            logprob=sampled.logprob,
            special=sampled.token_id in self._special_ids,
            top_logprobs=[(i, self.tokenizer.decode([i]), lp) for i, lp in sampled.top_logprobs]
            if sampled.top_logprobs is not None
            else None,
        )
        if tracked.detokenizer.stopped is not None:
            self.core.abort(request.request_id)
            del self._tracked[request.request_id]
            return self._final(tracked, [token], text, FinishReason.STOP_SEQUENCE)
        if core_output.finished:
            del self._tracked[request.request_id]
            token.text = text + tracked.detokenizer.flush()
            return self._final(tracked, [token], token.text, request.finish_reason)
        return RequestOutput(
            request.request_id, [token], text, len(request.prompt_token_ids), len(request.output_token_ids)
        )

    def _final(
        self, tracked: _Tracked, tokens: list[TokenInfo], text: str, reason: FinishReason | None
    ) -> RequestOutput:
        request = tracked.request
        return RequestOutput(
            request_id=request.request_id,
            tokens=tokens,
            text=text,
            prompt_tokens=len(request.prompt_token_ids),
            generated_tokens=len(request.output_token_ids),
            finished=True,
            finish_reason=reason,
            generated_text=tracked.detokenizer.text,
            prompt_logprobs=tracked.prompt_logprobs or None,
            timings=dataclasses.replace(request.timings, finished=time.monotonic()),
        )
