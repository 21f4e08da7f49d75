"""Adapter management: our inventory routes and vLLM's load/unload routes (what AIBrix and llm-d's router call).

    GET  /adapters               -> {"adapters": [{adapter_id, source, tier, version, rank, size_bytes, slot,
                                     requests, names}], "device_bytes", "device_budget_bytes", ...}
    POST /adapters/preload       {"adapter_id", "adapter_source", "api_token"} -> {"adapter_id", "source", "tier"}
    POST /adapters/unload        {"adapter_id", "adapter_source"} -> {"adapter_id", "source", "unloaded": true}
    POST /v1/load_lora_adapter   {"lora_name", "lora_path", "load_inplace"?, "source"?} -> text, as vLLM
    POST /v1/unload_lora_adapter {"lora_name"} -> text, as vLLM

Tiers, highest first: `device` (in the model's LoRA layers, read by the running batch), `host` (in memory), `disk`
(downloaded into the server's cache), `registered` (a name whose adapter has not been read yet). Unloading frees
the device and host memory and keeps the files; it answers 409 while requests use the adapter and 404 for an
adapter that is not loaded. Names and raw ids both work.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel

from loraserve.engine.api import AdapterInfo, AdapterRef, AsyncEngine
from loraserve.errors import InvalidRequest
from loraserve.server.auth import check_adapter, hub_token, visible
from loraserve.server.errors import error_response, error_responses
from loraserve.server.text import RequestBody

router = APIRouter(prefix="/adapters", tags=["adapters"])
vllm_router = APIRouter(prefix="/v1", tags=["adapters"])


class AdapterRequest(RequestBody):
    adapter_id: str
    adapter_source: str | None = None
    api_token: str | None = None


class LoadLoRARequest(RequestBody):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM: replace an adapter already registered under this name
    source: str | None = None  # ours: hub, local or s3; by default guessed from the path (see `_source_of`)


class UnloadLoRARequest(RequestBody):
    lora_name: str


class AdapterListing(BaseModel):
    adapters: list[AdapterInfo]
    device_adapters: int
    max_device_adapters: int
    device_bytes: int
    device_layer_bytes: int
    device_budget_bytes: int
    max_rank: int | None
    host_bytes: int
    host_capacity_bytes: int


class Preloaded(BaseModel):
    adapter_id: str
    source: str
    tier: Literal["device", "host"]


class Unloaded(BaseModel):
    adapter_id: str
    source: str
    unloaded: bool


# 422 also for a server without LoRA (--max-active-adapters 0)
_ERRORS = error_responses(401, 404, 413, 422, 424, 503)
_PLAIN_TEXT = {"text/plain": {"schema": {"type": "string"}}}


def _engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    if not engine.info().lora_enabled:
        raise InvalidRequest("this server runs without LoRA adapters (--max-active-adapters 0)")
    return engine


def _ref(engine: AsyncEngine, body: AdapterRequest, request: Request) -> AdapterRef:
    ref = AdapterRef(body.adapter_id, body.adapter_source or engine.info().adapter_source,
                     hub_token(request, body.api_token))
    return check_adapter(request, ref)


@router.get("", responses=error_responses(401, 422, 503))
async def list_adapters(request: Request) -> AdapterListing:
    engine = _engine(request)
    adapters = await engine.list_adapters()
    stats, info = engine.stats().adapters, engine.info()
    return AdapterListing(
        adapters=[a for a in adapters if visible(request, a)], device_adapters=stats.device_adapters,
        max_device_adapters=info.max_adapters, device_bytes=stats.device_bytes, device_layer_bytes=stats.layer_bytes,
        device_budget_bytes=info.adapter_device_budget, max_rank=info.max_lora_rank, host_bytes=stats.host_bytes,
        host_capacity_bytes=info.adapter_host_budget,
    )


@router.post("/preload", responses=_ERRORS)
async def preload(body: AdapterRequest, request: Request) -> Preloaded:
    engine = _engine(request)
    ref = _ref(engine, body, request)
    active = await engine.preload_adapter(ref)
    return Preloaded(adapter_id=body.adapter_id, source=ref.source, tier="device" if active else "host")


@router.post("/unload", responses=_ERRORS | error_responses(409))
async def unload(body: AdapterRequest, request: Request) -> Unloaded:
    engine = _engine(request)
    key = await engine.unload_adapter(_ref(engine, body, request))
    return Unloaded(adapter_id=body.adapter_id, source=key.source, unloaded=True)


def _source_of(path: str, default: str) -> str:
    """vLLM's `lora_path` is usually a folder: an absolute or ./ or ~ path is local, s3:// is S3, anything else
    takes the server's default source (--adapter-source)."""
    if path.startswith(("/", "./", "../", "~")):
        return "local"
    if path.startswith("s3://"):
        return "s3"
    return default


@vllm_router.post("/load_lora_adapter", response_class=Response, response_model=None,
                  responses={200: {"description": "Loaded (vLLM's text)", "content": _PLAIN_TEXT}}
                  | error_responses(400, 401, 404, 413, 422, 424, 503, openai=True))
async def load_lora_adapter(body: LoadLoRARequest, request: Request) -> PlainTextResponse | JSONResponse:
    engine = _engine(request)
    source = body.source or _source_of(body.lora_path, engine.info().adapter_source)
    check_adapter(request, AdapterRef(body.lora_name, source))
    check_adapter(request, AdapterRef(body.lora_path, source))
    token = hub_token(request, None)
    registered = {name for info in await engine.list_adapters() for name in info.names}
    if body.lora_name in registered and not body.load_inplace:
        message = f"The lora adapter '{body.lora_name}' has already been loaded."
        return error_response(request.url.path, message, "InvalidUserInput", 400)
    await engine.load_adapter(body.lora_name, AdapterRef(body.lora_path, source, token), replace=body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@vllm_router.post("/unload_lora_adapter", response_class=Response,
                  responses={200: {"description": "Unloaded (vLLM's text)", "content": _PLAIN_TEXT}}
                  | error_responses(401, 404, 409, 413, 422, 503, openai=True))
async def unload_lora_adapter(body: UnloadLoRARequest, request: Request) -> PlainTextResponse:
    engine = _engine(request)
    await engine.unload_adapter(check_adapter(request, AdapterRef(body.lora_name, engine.info().adapter_source)))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

