"""What the engine shows the outside: its fixed facts (`EngineInfo`) and a snapshot of its state (`EngineStats`).

The server, metrics and inventory read these, never the scheduler, block manager or residency themselves, so those
can change without touching a route. A snapshot is taken from any thread without stopping the step loop: each
field is one read of a counter or a copy of a queue, so fields may be a step apart, never torn.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.adapters.cache import LoadTimes
from loraserve.engine.request import Request


@dataclass(frozen=True)
class EngineInfo:
    model_name: str
    dtype: str
    device_type: str
    max_input_length: int
    max_total_tokens: int
    kv_capacity_tokens: int  # KV cache blocks x block size
    block_size: int
    num_kv_blocks: int
    max_running_requests: int
    lora_enabled: bool
    max_adapters: int  # adapters on the device at once
    max_lora_rank: int | None
    adapter_device_budget: int  # bytes
    adapter_host_budget: int  # bytes
    adapter_source: str  # the source of adapters named without one


@dataclass(frozen=True)
class AdapterCounters:
    host_loads: int
    host_hits: int
    host_evictions: int
    device_loads: int
    device_evictions: int
    device_adapters: int  # resident on the device now
    device_bytes: int  # their weights
    layer_bytes: int  # what the LoRA layers hold, free arena rows included
    host_bytes: int
    host_pins: int  # requests in flight holding their adapter in host memory (zero once all have ended)
    load_times: LoadTimes


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_kv_blocks: int
    num_kv_blocks: int
    num_preemptions: int
    running_adapters: tuple[str, ...]  # adapter names of running requests
    waiting_adapters: tuple[str, ...]  # ... of waiting ones (a request is in exactly one of the two)
    adapters: AdapterCounters

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_kv_blocks / self.num_kv_blocks


def adapter_names(requests: list[Request]) -> tuple[str, ...]:
    return tuple(sorted({r.adapter.adapter_id for r in requests if r.adapter is not None}))

