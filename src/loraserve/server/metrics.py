"""Prometheus metrics with vLLM's names, units and buckets under our prefix, plus per-adapter series; and the gauges
llm-d's endpoint picker, KServe and GKE's inference gateway score pods by, under vLLM's own names.

Request timings are observed on the output stream each route returns (time to first token, time per output token,
end to end); engine state (running and waiting requests, KV use, preemptions, adapter residency) is read at scrape
time, so the step loop never touches the registry.

The `vllm:` family, always served beside ours, with vLLM's types and meanings:
- `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (0-1) per `model_name`;
- `vllm:cache_config_info{block_size,num_gpu_blocks}` = 1 (KV blocks of this server, whatever the device);
- `vllm:lora_requests_info{max_lora,running_lora_adapters,waiting_lora_adapters}` = the scrape time; the two sets
  are the adapters of running and of waiting requests, each request in exactly one (vLLM's own can overlap);
- `vllm:lora_adapter_loaded{adapter_name,level,pinned,rank}` = 1 per resident adapter and tier: level `gpu` is our
  device tier (the model's LoRA layers, on the CPU too), `cpu` our host-memory tier; pinned `true` while requests use
  it on the device;
- `vllm:num_gpu_loaded_lora_adapters`, `vllm:max_gpu_lora_adapters` (our device tier and its count cap);
- `vllm:lora_adapter_load_seconds`, a histogram of loads into host memory (read or download and validation).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from loraserve.adapters.cache import LOAD_SECONDS_BUCKETS
from loraserve.engine.api import AdapterInfo, AsyncEngine, EngineInfo, EngineStats, RequestOutput
from loraserve.server.tracing import RequestTracer

PREFIX = "loraserve:"
VLLM_PREFIX = "vllm:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class _EngineState(Collector):
    """Gauges and counters read from the engine's stats snapshot at scrape time, and the residency snapshot the
    scrape took just before (`Metrics.exposition`)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.resident: list[AdapterInfo] = []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        stats, info = self.engine.stats(), self.engine.info()
        name = info.model_name
        for prefix in (PREFIX, VLLM_PREFIX):
            for metric, value, text in (
                ("num_requests_running", stats.num_running, "Requests in the running batch."),
                ("num_requests_waiting", stats.num_waiting, "Requests waiting to be scheduled."),
                ("kv_cache_usage_perc", stats.kv_cache_usage, "Share of KV blocks in use (1 = full)."),
            ):
                gauge = GaugeMetricFamily(prefix + metric, text, labels=["model_name"])
                gauge.add_metric([name], value)
                yield gauge
        preemptions = CounterMetricFamily(PREFIX + "num_preemptions", "Preemptions (recompute).", labels=["model_name"])
        preemptions.add_metric([name], stats.num_preemptions)
        yield preemptions
        cache = GaugeMetricFamily(VLLM_PREFIX + "cache_config_info", "KV cache configuration.",
                                  labels=["block_size", "num_gpu_blocks"])
        cache.add_metric([str(info.block_size), str(info.num_kv_blocks)], 1.0)
        yield cache
        if info.lora_enabled:
            yield from _adapter_metrics(stats, info)
            yield from _vllm_residency(stats, info, self.resident)


def _adapter_metrics(stats: EngineStats, info: EngineInfo) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """vLLM's `lora_requests_info` (gateways route by it) under both prefixes, and the adapter tiers' counters."""
    for prefix in (PREFIX, VLLM_PREFIX):
        requests = GaugeMetricFamily(prefix + "lora_requests_info", "Adapters of running and waiting requests.",
                                     labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        requests.add_metric([str(info.max_adapters), ",".join(stats.running_adapters),
                             ",".join(stats.waiting_adapters)], time.time())
        yield requests
    counters = stats.adapters
    for metric, value, text in (
        ("adapter_host_loads", counters.host_loads, "Adapters read from disk or downloaded into host memory."),
        ("adapter_host_hits", counters.host_hits, "Adapter lookups served from host memory."),
        ("adapter_host_evictions", counters.host_evictions, "Adapters evicted from host memory."),
        ("adapter_device_loads", counters.device_loads, "Adapters copied into the model's LoRA layers."),
        ("adapter_device_evictions", counters.device_evictions, "Adapters evicted from the model's LoRA layers."),
    ):
        counter = CounterMetricFamily(PREFIX + metric, text)
        counter.add_metric([], value)
        yield counter
    for metric, value, text in (
        ("adapters_on_device", counters.device_adapters, "Adapters resident in the model's LoRA layers."),
        ("adapter_device_bytes", counters.device_bytes, "Bytes of adapter weights resident on the device."),
        ("adapter_host_bytes", counters.host_bytes, "Bytes of adapters held in host memory."),
        ("adapter_pins", counters.host_pins, "Requests in flight holding their adapter in host memory."),
    ):
        gauge = GaugeMetricFamily(PREFIX + metric, text)
        gauge.add_metric([], value)
        yield gauge


def _vllm_residency(stats: EngineStats, info: EngineInfo, resident: list[AdapterInfo]) -> Iterator[
        GaugeMetricFamily | HistogramMetricFamily]:
    """vLLM's residency family (see the module docstring for how our tiers map onto its levels)."""
    loaded = GaugeMetricFamily(VLLM_PREFIX + "lora_adapter_loaded", "Adapters resident, per tier.",
                               labels=["adapter_name", "level", "pinned", "rank"])
    for adapter in resident:
        level = "gpu" if adapter.tier == "device" else "cpu"
        for adapter_name in adapter.names or (adapter.adapter_id,):
            loaded.add_metric([adapter_name, level, str(adapter.requests > 0).lower(), str(adapter.rank)], 1.0)
    yield loaded
    for metric, value, text in (
        ("num_gpu_loaded_lora_adapters", stats.adapters.device_adapters, "Adapters in the device tier."),
        ("max_gpu_lora_adapters", info.max_adapters, "Most adapters the device tier holds at once."),
    ):
        gauge = GaugeMetricFamily(VLLM_PREFIX + metric, text)
        gauge.add_metric([], value)
        yield gauge
    times = stats.adapters.load_times
    buckets = [(str(bound), count) for bound, count in zip(LOAD_SECONDS_BUCKETS, times.bucket_counts)]
    histogram = HistogramMetricFamily(VLLM_PREFIX + "lora_adapter_load_seconds", "Time to load an adapter into "
                                      "host memory (read or download, validate).")
    histogram.add_metric([], buckets + [("+Inf", times.count)], sum_value=times.total_seconds)
    yield histogram


class Metrics:
    """Every request's observations: Prometheus series, and its trace where tracing is on."""

    def __init__(self, engine: AsyncEngine, tracer: RequestTracer) -> None:
        self.registry = CollectorRegistry()
        self.tracer = tracer
        self.model_name = engine.info().model_name
        labels = ["model_name", "adapter"]
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram(PREFIX + "request_time_per_output_token_seconds", "Mean time per output token.",
                              labels, buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.queue = Histogram(PREFIX + "request_queue_time_seconds", "Time from arrival (adapter loading included) "
                               "to the first scheduled step.", labels, buckets=E2E_BUCKETS, registry=self.registry)
        self.inference = Histogram(PREFIX + "request_inference_time_seconds", "Time from the first scheduled step to "
                                   "the end.", labels, buckets=E2E_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry)
        self.success = Counter(PREFIX + "request_success", "Finished requests.", labels + ["finished_reason"],
                               registry=self.registry)
        self._state = _EngineState(engine)
        self.registry.register(self._state)

    def exposition(self, resident: list[AdapterInfo]) -> bytes:
        """The registry as Prometheus text, with `resident` (a residency snapshot the caller took) for the vLLM
        residency family."""
        self._state.resident = resident
        return generate_latest(self.registry)

    async def observed(self, outputs: AsyncIterator[RequestOutput], adapter: str) -> AsyncIterator[RequestOutput]:
        """Pass `outputs` through, recording the request's timings and token counts (and its trace) when it
        finishes."""
        labels = (self.model_name, adapter)
        start = time.monotonic()
        first: float | None = None
        generated, finished = 0, False
        try:
            async for output in outputs:
                first = self._record(output, labels, start, first)
                generated = output.generated_tokens
                finished = output.finished
                yield output
        finally:
            if not finished:  # aborted: its tokens were still computed
                self.generation_tokens.labels(*labels).inc(generated)
            await outputs.aclose()  # a consumer that stops early aborts the request underneath

    def _record(self, output: RequestOutput, labels: tuple[str, str], start: float, first: float | None) -> float | None:
        """Observe one output; returns the time of the first token (set by this output if it is the first)."""
        now = time.monotonic()
        if first is None and output.tokens:
            self.ttft.labels(*labels).observe(now - start)
            first = now
        if not output.finished:
            return first
        self.e2e.labels(*labels).observe(now - start)
        if output.timings is not None:
            self.queue.labels(*labels).observe(output.timings.queue)
            self.inference.labels(*labels).observe(output.timings.inference)
        if output.generated_tokens > 1:
            self.tpot.labels(*labels).observe((now - first) / (output.generated_tokens - 1))
        self.prompt_tokens.labels(*labels).inc(output.prompt_tokens)
        self.generation_tokens.labels(*labels).inc(output.generated_tokens)
        reason = output.finish_reason.value if output.finish_reason else "unknown"
        self.success.labels(*labels, reason).inc()
        self.tracer.record(output, labels[1])
        return first
