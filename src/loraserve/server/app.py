"""Wires the async engine into a FastAPI app and runs it with uvicorn; route logic lives in the feature folders."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable

import uvicorn
from fastapi import FastAPI
from starlette.datastructures import State
from starlette.types import ASGIApp, Receive, Scope, Send

from loraserve import __version__
from loraserve.config import EngineConfig, ServerConfig
from loraserve.engine.api import AsyncEngine
from loraserve.server.admission import ConcurrencyLimit
from loraserve.server.auth import KeyGate, KeyRing
from loraserve.server.disconnect import SendTimeout
from loraserve.server.errors import error_response, install_error_handlers
from loraserve.server.inventory import router as inventory_router
from loraserve.server.inventory import vllm_router as vllm_adapters_router
from loraserve.server.limits import BodyLimit
from loraserve.server.lorax.routes import router as lorax_router
from loraserve.server.metrics import Metrics
from loraserve.server.openai.routes import router as openai_router
from loraserve.server.openapi import install_openapi
from loraserve.server.rate_limit import RateLimit, TokenBuckets
from loraserve.server.tracing import RequestTracer

logger = logging.getLogger(__name__)
_ALWAYS_SERVED = {"/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"}  # what needs no model


class _ReadyGate:
    """503 for every route that needs the model while it loads, and for every new request while the server drains
    (`/health` included, so a load balancer stops sending). Plain ASGI: Starlette's `BaseHTTPMiddleware` would
    wrap every streamed response and hide client disconnects from the routes."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in _ALWAYS_SERVED:
            message = None
            if self.state.engine is None:
                message = "the model is still loading"
            elif self.state.draining and scope["path"] != "/metrics":
                message = "the server is shutting down"
            if message is not None:
                await error_response(scope["path"], message, "unhealthy", 503)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(load_engine: Callable[[], AsyncEngine], server_config: ServerConfig,
              start_engine: Callable[[AsyncEngine], None] = AsyncEngine.start) -> FastAPI:
    """An app that answers at once and loads its engine in the background.

    Until the model is loaded, `/health` and every generation route answer 503 (LoRAX's behaviour while its shards
    load), so an orchestrator sees a live process that is not ready yet. A load failure is logged and ends the
    process with status 1: a server that cannot serve should not linger. `start_engine` starts the loaded engine's
    step loop and returns once it runs.
    """

    def load() -> None:
        try:
            engine = load_engine()
        except BaseException:  # noqa: BLE001 - whatever stops the load, the process must not hang half-started
            logger.exception("loading the model failed")
            os._exit(1)
        app.state.metrics = Metrics(engine, RequestTracer(server_config.otlp_endpoint, engine.info().model_name))
        start_engine(engine)
        app.state.engine = engine

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load, name="loraserve-model-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            if app.state.engine is not None:
                app.state.engine.shutdown()
                app.state.metrics.tracer.shutdown()

    app = FastAPI(title="loraserve", version=__version__, lifespan=lifespan)
    app.state.engine = None
    app.state.draining = False
    app.state.server_config = server_config
    app.state.admission = ConcurrencyLimit(server_config.max_concurrent_requests)

    app.state.keys = KeyRing.from_config(server_config.api_key, server_config.api_keys_file)
    # the last added runs first: body size, then the key, then the caller's rate, then readiness
    app.add_middleware(_ReadyGate, state=app.state)
    if server_config.rate_limit_per_minute > 0:
        burst = server_config.rate_limit_burst or math.ceil(server_config.rate_limit_per_minute)
        app.add_middleware(RateLimit, buckets=TokenBuckets(server_config.rate_limit_per_minute, burst),
                           keyed=app.state.keys.enabled)
    app.add_middleware(KeyGate, keys=app.state.keys, metrics_open=not server_config.metrics_require_key)
    app.add_middleware(BodyLimit, max_bytes=server_config.max_request_bytes)
    app.add_middleware(SendTimeout, seconds=server_config.stream_idle_timeout)
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(lorax_router)
    app.include_router(openai_router)
    app.include_router(inventory_router)
    app.include_router(vllm_adapters_router)
    return app


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """Serve at once; the model loads in the background (503 until it is ready), then serve until a signal.

    uvicorn runs in a thread and the engine's step loop on the main thread, where oneDNN's matmuls run fastest (see
    `AsyncEngine.run`). SIGINT or SIGTERM drains (`_drain_then_stop`); a second signal stops at once.
    """
    handoff: queue.Queue[AsyncEngine] = queue.Queue()
    stopping, forced = threading.Event(), threading.Event()

    def hand_to_main_thread(engine: AsyncEngine) -> None:
        handoff.put(engine)
        while not engine.is_running and not stopping.is_set():
            time.sleep(0.001)

    app = build_app(lambda: AsyncEngine.from_config(engine_config), server_config, hand_to_main_thread)
    server = uvicorn.Server(uvicorn.Config(app, host=server_config.hostname, port=server_config.port,
                                           log_level="info"))

    def stop(*_: object) -> None:
        if stopping.is_set():
            forced.set()
        stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    web = threading.Thread(target=server.run, name="loraserve-http")
    web.start()
    while not stopping.is_set() and web.is_alive():
        try:
            engine = handoff.get(timeout=0.2)
        except queue.Empty:
            continue
        threading.Thread(target=_drain_then_stop, args=(app, engine, web, stopping, forced,
                                                        server_config.shutdown_timeout), daemon=True).start()
        engine.run()
        break
    server.should_exit = True
    web.join()


def _drain_then_stop(app: FastAPI, engine: AsyncEngine, web: threading.Thread, stopping: threading.Event,
                     forced: threading.Event, timeout: float) -> None:
    """Once a signal came: answer 503 to new requests (and `/health`), let the accepted ones finish for up to
    `timeout` seconds, then end the step loop: what still runs gets an explicit error, never a dropped connection."""
    while not stopping.is_set() and web.is_alive():
        time.sleep(0.1)
    app.state.draining = True
    logger.info("draining: %d request(s) in flight, up to %.0f s", app.state.admission.in_flight, timeout)
    deadline = time.monotonic() + timeout
    while app.state.admission.in_flight and time.monotonic() < deadline and not forced.is_set() and web.is_alive():
        time.sleep(0.05)
    engine.shutdown()
