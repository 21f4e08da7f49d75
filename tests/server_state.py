"""What a running server holds, read over HTTP (its engine gauges on /metrics), and SSE replies read to their end."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

_GAUGES = {"loraserve:num_requests_running": "running", "loraserve:num_requests_waiting": "waiting",
           "loraserve:kv_cache_usage_perc": "kv_usage", "loraserve:adapter_pins": "adapter_pins"}
IDLE = {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0, "adapter_pins": 0.0}


def engine_gauges(url: str) -> dict[str, float]:
    """Requests running and waiting, the share of KV blocks in use, adapter pins, and tokens generated so far."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    gauges = {_GAUGES[f.name]: f.samples[0].value for f in families if f.name in _GAUGES}
    generated = [f for f in families if f.name == "loraserve:generation_tokens"]
    gauges["generated_tokens"] = sum(s.value for f in generated for s in f.samples if s.name.endswith("_total"))
    return gauges


def wait_until_idle(url: str, timeout: float = 60.0) -> dict[str, float]:
    """Poll until nothing runs or waits, every KV block is free and no adapter is pinned; the last gauges."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = engine_gauges(url)
        if {name: gauges[name] for name in IDLE} == IDLE:
            return gauges
        assert time.monotonic() < deadline, f"the server still holds requests or their resources: {gauges}"
        time.sleep(0.1)


def sse_data(raw: bytes) -> list[dict | str]:
    """The `data:` payload of each event, parsed from JSON (OpenAI's closing `[DONE]` stays a string)."""
    payloads = [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]
    return [payload.decode() if payload == b"[DONE]" else json.loads(payload) for payload in payloads]


def read_stream(url: str, body: dict, timeout: float = 120.0) -> tuple[int, list[dict | str]]:
    """POST `body` and read the reply to its end: a chunked stream cut short raises `http.client.IncompleteRead`, so
    a returned list means the stream ended cleanly. Error replies come back as a one-element list of their body."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, sse_data(response.read())
    except urllib.error.HTTPError as error:
        return error.code, [json.loads(error.read())]
