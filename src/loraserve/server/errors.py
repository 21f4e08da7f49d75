"""Engine exceptions -> HTTP status and error body: LoRAX's `{error, error_type}`, or OpenAI's
`{error: {message, type, param, code}}` under /v1. The same models document every route's error responses, so the
OpenAPI document says what the server really answers."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from loraserve.errors import (
    AdapterInUse,
    AdapterNotFound,
    ClientGone,
    DeadlineExceeded,
    EngineDead,
    InvalidRequest,
    LoraserveError,
    Overloaded,
)

_STATUS: list[tuple[type[Exception], int, str]] = [
    (AdapterInUse, 409, "conflict"),
    (ClientGone, 499, "client_closed_request"),  # nginx's code: nobody reads it
    (InvalidRequest, 422, "validation"),
    (Overloaded, 429, "overloaded"),
    (EngineDead, 503, "unhealthy"),
    (DeadlineExceeded, 504, "timeout"),  # gRPC's DEADLINE_EXCEEDED: the server ran out of the request's time
    (LoraserveError, 424, "generation"),
]


class ErrorResponse(BaseModel):
    """LoRAX's error body."""

    error: str
    error_type: str


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body, on every route under /v1."""

    error: OpenAIError


class BodyTooLarge(Exception):
    """Raised while a body is read, once it passes --max-request-bytes (see `limits.BodyLimit`)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the request body is larger than {max_bytes} bytes (--max-request-bytes)")


_DESCRIPTIONS = {
    400: "The request conflicts with the server's state (an adapter name already loaded)",
    401: "No valid API key (only on servers started with keys)",
    404: "No such adapter (or one the caller's key may not use)",
    409: "The adapter is in use by requests in flight",
    413: "The body is larger than --max-request-bytes",
    422: "The request is invalid or over one of the server's limits; the message names the limit",
    424: "The adapter could not be loaded, or the generation failed",
    429: "Over --max-concurrent-requests, or over the caller's rate limit (then with Retry-After)",
    499: "The client disconnected before the reply was ready (never read by it; logged)",
    503: "The model is still loading, or the server is shutting down",
    504: "The request passed its deadline (`request_timeout`, at most --max-request-seconds) and was aborted",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds until the rate limit allows another request",
                                "schema": {"type": "integer"}}}


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict]:
    """The `responses=` of a route that can answer `statuses`, in the body shape its path answers with."""
    model = OpenAIErrorResponse if openai else ErrorResponse
    return {status: {"model": model, "description": _DESCRIPTIONS[status]} | (
        {"headers": _RETRY_AFTER} if status == 429 else {}) for status in statuses}


def status_for(error: Exception, path: str) -> tuple[int, str]:
    """The status and error type for an exception raised while serving a request on `path`. A missing adapter is
    LoRAX's 424 on its generation routes, OpenAI's 404 for an unknown `model` under /v1, and 404 on the adapter
    management routes."""
    if isinstance(error, AdapterNotFound) and path.startswith(("/v1/", "/adapters")):
        return 404, "not_found"
    for kind, status, error_type in _STATUS:
        if isinstance(error, kind):
            return status, error_type
    return 424, "generation"


def error_body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


def openai_error_body(message: str, error_type: str, status: int) -> dict[str, dict]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": status}}


def error_response(path: str, message: str, error_type: str, status: int,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The one way every part of the server (routes and ASGI gates) answers an error: LoRAX's body, or OpenAI's
    under /v1."""
    if path.startswith("/v1/"):
        return JSONResponse(openai_error_body(message, error_type, status), status_code=status, headers=headers)
    return JSONResponse(error_body(message, error_type), status_code=status, headers=headers)


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if part != "body")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{_location(e['loc'])}: {e['msg']}" if _location(e["loc"]) else e["msg"]
                            for e in error.errors())
        return error_response(request.url.path, f"Input validation error: {details}", "validation", 422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        # FastAPI turns whatever fails while it reads the body into a bare 400: a body that grew past the limit
        # while it streamed in, or JSON nested past the parser's depth
        if isinstance(error.__cause__, BodyTooLarge):
            return error_response(request.url.path, str(error.__cause__), "request_too_large", 413)
        if error.status_code == 400:
            return error_response(request.url.path, "Input validation error: the body cannot be parsed as JSON",
                                  "validation", 422)
        return error_response(request.url.path, str(error.detail), "http", error.status_code, error.headers)

    @app.exception_handler(LoraserveError)
    async def _engine(request: Request, error: LoraserveError) -> JSONResponse:
        status, error_type = status_for(error, request.url.path)
        return error_response(request.url.path, str(error), error_type, status)
