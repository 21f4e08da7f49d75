"""OpenTelemetry traces, one per finished request, exported over OTLP/HTTP when `--otlp-endpoint` is set.

A request's trace is built when it ends, from the timestamps the engine kept (`RequestTimings`), so nothing on the
step loop waits on tracing: a `request` span with children `queue` (arrival to its first scheduled step, adapter
loading included), `adapter_load` (arrival to its adapter being host-resident, for requests with one), `prefill` (first
scheduled step to first token) and `decode` (first token to the end). Attributes follow OpenTelemetry's `gen_ai.*`
conventions where they exist. Without an endpoint the tracer is a no-op.
"""

from __future__ import annotations

import time

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Tracer, set_span_in_context

from loraserve import __version__
from loraserve.engine.api import RequestOutput


class RequestTracer:
    def __init__(self, endpoint: str | None, model_name: str) -> None:
        self.model_name = model_name
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        if endpoint is not None:
            self._provider = TracerProvider(resource=Resource.create({"service.name": "loraserve",
                                                                      "service.version": __version__}))
            exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
            self._provider.add_span_processor(BatchSpanProcessor(exporter))
            self._tracer = self._provider.get_tracer("loraserve")

    def record(self, output: RequestOutput, adapter: str) -> None:
        """Export the trace of a request that just finished (its last output)."""
        timings = output.timings
        if self._tracer is None or timings is None or timings.finished is None:
            return
        # monotonic seconds -> epoch nanoseconds, anchored at this moment
        offset = time.time_ns() - int(time.monotonic() * 1e9)

        def ns(moment: float) -> int:
            return offset + int(moment * 1e9)

        attributes = {"gen_ai.operation.name": "text_completion", "gen_ai.request.model": self.model_name,
                      "gen_ai.usage.input_tokens": output.prompt_tokens,
                      "gen_ai.usage.output_tokens": output.generated_tokens,
                      "gen_ai.response.finish_reasons": [output.finish_reason.value if output.finish_reason
                                                         else "unknown"],
                      "loraserve.request_id": output.request_id, "loraserve.adapter": adapter}
        root = self._tracer.start_span("request", start_time=ns(timings.arrival), attributes=attributes)
        context = set_span_in_context(root)
        scheduled = timings.first_scheduled or timings.finished
        phases = [("queue", timings.arrival, scheduled)]
        if timings.adapter_ready is not None:
            phases.append(("adapter_load", timings.arrival, timings.adapter_ready))
        if timings.first_token is not None:
            phases += [("prefill", scheduled, timings.first_token), ("decode", timings.first_token, timings.finished)]
        for name, start, end in phases:
            self._tracer.start_span(name, context=context, start_time=ns(start)).end(end_time=ns(end))
        root.end(end_time=ns(timings.finished))

    def shutdown(self) -> None:
        """Flush what is still batched."""
        if self._provider is not None:
            self._provider.shutdown()
