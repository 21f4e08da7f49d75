"""Wires the async engine into a FastAPI app and runs it with uvicorn; route logic lives in the feature folders."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from loraserve import __version__
from loraserve.config import EngineConfig, ServerConfig
from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.engine import Engine
from loraserve.server.admission import ConcurrencyLimit
from loraserve.server.errors import install_error_handlers
from loraserve.server.metrics import Metrics
from loraserve.server.inventory import router as inventory_router
from loraserve.server.lorax.routes import router as lorax_router
from loraserve.server.openai.routes import router as openai_router


def build_app(engine: AsyncEngine, server_config: ServerConfig) -> FastAPI:
    """An app serving `engine`; the engine's step loop starts and stops with the app."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="loraserve", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.server_config = server_config
    app.state.admission = ConcurrencyLimit(server_config.max_concurrent_requests)
    app.state.metrics = Metrics(engine)
    install_error_handlers(app)
    app.include_router(lorax_router)
    app.include_router(openai_router)
    app.include_router(inventory_router)
    return app


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """Load the model, then serve until interrupted."""
    engine = AsyncEngine(Engine.from_config(engine_config))
    app = build_app(engine, server_config)
    uvicorn.run(app, host=server_config.hostname, port=server_config.port, log_level="info")
