"""Exceptions of the client: one class per failure a caller handles differently, all under `LoraserveError`.

The server answers `{"error": "...", "error_type": "..."}` (LoRAX), or `{"error": {"message", "type", "code"}}` under
/v1 (OpenAI); inside an SSE stream the same bodies arrive as a `data:` event after a 200, so the `error_type` decides.
"""

from __future__ import annotations

import json
from typing import Any


class LoraserveError(Exception):
    """Base of every error raised by the client. `status` is the HTTP status (None when no response arrived)."""

    status_code: int | None = None

    def __init__(self, message: str, status: int | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status if status is not None else self.status_code
        self.error_type = error_type

    def __str__(self) -> str:
        return f"{self.status}: {self.message}" if self.status is not None else self.message


class BadRequestError(LoraserveError):
    """Malformed request (400)."""

    status_code = 400


class NotFoundError(LoraserveError):
    """Wrong route: usually a base_url that is not a loraserve/LoRAX server (404)."""

    status_code = 404


class ValidationError(LoraserveError):
    """A parameter or the prompt was rejected (422); fix the request, do not retry it."""

    status_code = 422


class GenerationError(LoraserveError):
    """Generation failed on the server, including an adapter that cannot be found or loaded (424)."""

    status_code = 424


class IncompleteGenerationError(LoraserveError):
    """A stream ended before its final event."""

    status_code = 500


class OverloadedError(LoraserveError):
    """The server has no room for the request (429); retried automatically, raised when retries run out."""

    status_code = 429


class UnavailableError(LoraserveError):
    """The server is not ready or its engine is down (503); retried automatically, raised when retries run out."""

    status_code = 503


class APIConnectionError(LoraserveError):
    """No usable response: the connection failed or broke."""


class APITimeoutError(APIConnectionError):
    """The connect, read or write timeout ran out."""


_BY_STATUS: dict[int, type[LoraserveError]] = {
    400: BadRequestError, 404: NotFoundError, 422: ValidationError, 424: GenerationError, 429: OverloadedError,
    503: UnavailableError,
}
_BY_TYPE: dict[str, type[LoraserveError]] = {
    "validation": ValidationError, "invalid_request_error": ValidationError, "generation": GenerationError,
    "incomplete_generation": IncompleteGenerationError, "overloaded": OverloadedError, "unhealthy": UnavailableError,
    "healthcheck": UnavailableError,
}


def error_from_body(status: int, body: bytes) -> LoraserveError:
    """The exception for an HTTP error response; the status decides the class, the body gives message and type."""
    message, error_type = _message_and_type(body)
    kind = _BY_STATUS.get(status) or _BY_TYPE.get(error_type or "", LoraserveError)
    return kind(message or f"HTTP {status}", status, error_type)


def error_from_event(payload: dict[str, Any]) -> LoraserveError:
    """The exception for an error event inside a stream (status 200): only the `error_type` can tell the class."""
    message, error_type = _fields(payload)
    kind = _BY_TYPE.get(error_type or "", LoraserveError)
    return kind(message or "error event in stream", None, error_type)


def _message_and_type(body: bytes) -> tuple[str, str | None]:
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip(), None
    if not isinstance(payload, dict):
        return str(payload), None
    return _fields(payload)


def _fields(payload: dict[str, Any]) -> tuple[str, str | None]:
    """Message and type from a LoRAX body, an OpenAI body, or FastAPI's default `{"detail": ...}`."""
    error = payload.get("error", payload.get("detail", ""))
    if isinstance(error, dict):
        return str(error.get("message", "")), error.get("type")
    return str(error), payload.get("error_type")
