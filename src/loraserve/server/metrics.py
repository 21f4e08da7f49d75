"""Prometheus metrics with vLLM's names, units and buckets under our prefix, plus per-adapter series.

Request timings are observed on the output stream each route returns (time to first token, time per output token,
end to end); engine state (running and waiting requests, KV use, preemptions, adapter slots) is read at scrape time,
so the step loop never touches the registry.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loraserve.engine.api import AsyncEngine, EngineStats, RequestOutput

PREFIX = "loraserve:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class _EngineState(Collector):
    """Gauges and counters read from the engine's stats snapshot at scrape time."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats, info = self.engine.stats(), self.engine.info()
        name = info.model_name
        for metric, value, text in (
            ("num_requests_running", stats.num_running, "Requests in the running batch."),
            ("num_requests_waiting", stats.num_waiting, "Requests waiting to be scheduled."),
            ("kv_cache_usage_perc", stats.kv_cache_usage, "Share of KV blocks in use."),
        ):
            gauge = GaugeMetricFamily(PREFIX + metric, text, labels=["model_name"])
            gauge.add_metric([name], value)
            yield gauge
        preemptions = CounterMetricFamily(PREFIX + "num_preemptions", "Preemptions (recompute).", labels=["model_name"])
        preemptions.add_metric([name], stats.num_preemptions)
        yield preemptions
        if info.lora_enabled:
            yield from _adapter_metrics(stats, info.max_adapters)


def _adapter_metrics(stats: EngineStats, max_adapters: int) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """vLLM's `lora_requests_info` (gateways route by it), and the adapter tiers' counters."""
    info = GaugeMetricFamily(PREFIX + "lora_requests_info", "Adapters of running and waiting requests.",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    info.add_metric([str(max_adapters), ",".join(stats.running_adapters), ",".join(stats.waiting_adapters)],
                    time.time())
    yield info
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
    ):
        gauge = GaugeMetricFamily(PREFIX + metric, text)
        gauge.add_metric([], value)
        yield gauge


class Metrics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
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
        self.registry.register(_EngineState(engine))

    async def observed(self, outputs: AsyncIterator[RequestOutput], adapter: str) -> AsyncIterator[RequestOutput]:
        """Pass `outputs` through, recording the request's timings and token counts when it finishes."""
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
        return first
