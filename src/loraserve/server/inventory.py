"""Adapter management beyond LoRAX: list every known adapter with its tier, preload one ahead of traffic, unload one.

    GET  /adapters          -> {"adapters": [{adapter_id, source, tier, rank, size_bytes, slot, requests}], ...}
    POST /adapters/preload  {"adapter_id", "adapter_source", "api_token"} -> {"adapter_id", "source", "tier"}
    POST /adapters/unload   {"adapter_id", "adapter_source"} -> {"adapter_id", "source", "unloaded": true}

Tiers, highest first: `active` (in a LoRA slot, read by the running batch), `host` (in memory), `disk` (downloaded
into the server's cache). Unloading drops the memory tiers and keeps the files; it answers 409 while requests use
the adapter and 404 for an adapter that is in neither tier.
"""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.request import AdapterRef
from loraserve.errors import InvalidRequest
from loraserve.server.convert import request_token
from loraserve.server.errors import error_body

router = APIRouter(prefix="/adapters", tags=["adapters"])


class AdapterRequest(BaseModel):
    adapter_id: str
    adapter_source: str = "hub"
    api_token: str | None = None


def _engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    if engine.engine.lora is None:
        raise InvalidRequest("this server runs without LoRA slots (--max-active-adapters 0)")
    return engine


@router.get("")
async def list_adapters(request: Request) -> dict:
    engine = _engine(request)
    lora = engine.engine.lora
    adapters = await engine.run_between_steps(lora.inventory)
    return {
        "adapters": [dataclasses.asdict(info) for info in adapters],
        "slots": len(lora.ranks),
        "max_rank": lora.max_rank,
        "host_bytes": lora.host.nbytes,
        "host_capacity_bytes": lora.host.max_bytes,
    }


@router.post("/preload")
async def preload(body: AdapterRequest, request: Request) -> dict:
    engine = _engine(request)
    config = engine.engine.config
    token = request_token(body.api_token, request.headers.get("authorization"),
                          config.hf_token if config.adapter_uses_server_token else None)
    active = await engine.preload_adapter(AdapterRef(body.adapter_id, body.adapter_source, token))
    return {"adapter_id": body.adapter_id, "source": body.adapter_source, "tier": "active" if active else "host"}


@router.post("/unload", response_model=None)
async def unload(body: AdapterRequest, request: Request) -> dict | JSONResponse:
    engine = _engine(request)
    lora = engine.engine.lora
    if not await engine.run_between_steps(lambda: lora.unload(body.adapter_id, body.adapter_source)):
        message = f"adapter {body.adapter_id!r} ({body.adapter_source}) is not loaded"
        return JSONResponse(error_body(message, "not_found"), status_code=404)
    return {"adapter_id": body.adapter_id, "source": body.adapter_source, "unloaded": True}
