"""OpenTelemetry traces over OTLP/HTTP: a collector stand-in on loopback decodes what the server exports with the
OTLP protobuf schema (opentelemetry-proto), one trace per request with its phases."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from server_process import post_json, running_server
from tiny_models import save_random_adapter, save_tiny_model, tiny_config


class _Collector(BaseHTTPRequestHandler):
    spans: list = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            export = ExportTraceServiceRequest.FromString(body)
            for resource in export.resource_spans:
                for scope in resource.scope_spans:
                    _Collector.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def test_each_request_exports_a_trace_with_its_phases(tmp_path: Path) -> None:
    base_dir = save_tiny_model(tiny_config("llama"), tmp_path / "base")
    adapter = save_random_adapter(base_dir, tmp_path / "adapter", seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    args = ["--model-id", str(base_dir), "--dtype", "float32", "--device", "cpu", "--otlp-endpoint", endpoint]
    try:
        with running_server(args, tmp_path / "server.log", env={"OTEL_BSP_SCHEDULE_DELAY": "100"}) as url:
            body = {"inputs": "Paris is", "parameters": {"adapter_id": str(adapter), "adapter_source": "local",
                                                         "max_new_tokens": 5, "ignore_eos_token": True}}
            assert post_json(url + "/generate", body)[0] == 200
            deadline = time.monotonic() + 30
            while len(_Collector.spans) < 5:
                assert time.monotonic() < deadline, f"spans seen: {[s.name for s in _Collector.spans]}"
                time.sleep(0.1)
    finally:
        collector.shutdown()
    spans = {span.name: span for span in _Collector.spans}
    assert set(spans) == {"request", "queue", "adapter_load", "prefill", "decode"}
    root = spans["request"]
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["loraserve.adapter"].string_value == str(adapter)
    assert attributes["gen_ai.usage.output_tokens"].int_value == 5
    for name in ("queue", "adapter_load", "prefill", "decode"):
        span = spans[name]
        assert span.trace_id == root.trace_id and span.parent_span_id == root.span_id, name
        assert root.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= root.end_time_unix_nano, name
    assert spans["prefill"].end_time_unix_nano == spans["decode"].start_time_unix_nano
    assert abs(root.end_time_unix_nano / 1e9 - time.time()) < 120
