"""Python client of loraserve's LoRAX-compatible REST API (and its OpenAI chat route).

Standalone: it imports nothing else from loraserve, only httpx2 and pydantic, so it can be vendored or used against
any LoRAX server. `Client` blocks, `AsyncClient` awaits; both share one request builder and one parser.
"""

from loraserve.client._async import AsyncClient
from loraserve.client._sync import Client
from loraserve.client.errors import (
    APIConnectionError,
    APITimeoutError,
    BadRequestError,
    GenerationError,
    IncompleteGenerationError,
    LoraserveError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
    ValidationError,
)
from loraserve.client.types import (
    AlternativeToken,
    BestOfSequence,
    ChatParameters,
    Details,
    GenerateParameters,
    InputToken,
    Response,
    StreamDetails,
    StreamResponse,
    Token,
)

__all__ = [
    "APIConnectionError", "APITimeoutError", "AlternativeToken", "AsyncClient", "BadRequestError", "BestOfSequence",
    "ChatParameters", "Client", "Details", "GenerateParameters", "GenerationError", "IncompleteGenerationError",
    "InputToken", "LoraserveError", "NotFoundError", "OverloadedError", "Response", "StreamDetails", "StreamResponse",
    "Token", "UnavailableError", "ValidationError",
]
