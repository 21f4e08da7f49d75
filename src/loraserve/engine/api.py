"""The engine's public face: everything the server (or any other front) may use, and nothing else.

The server imports only this module of the engine (an import-linter contract checks it), so the scheduler, the
block manager, the residency and the runner can change shape without touching a route.
"""

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.engine import RequestOutput, TokenInfo
from loraserve.engine.llm import Completion, collect
from loraserve.engine.request import AdapterRef, FinishReason
from loraserve.engine.residency import AdapterInfo
from loraserve.engine.stats import AdapterCounters, EngineInfo, EngineStats

__all__ = [
    "AdapterCounters",
    "AdapterInfo",
    "AdapterRef",
    "AsyncEngine",
    "Completion",
    "EngineInfo",
    "EngineStats",
    "FinishReason",
    "RequestOutput",
    "TokenInfo",
    "collect",
]
