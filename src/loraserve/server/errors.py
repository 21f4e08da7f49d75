"""Engine exceptions -> HTTP status and LoRAX's `{error, error_type}` body."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from loraserve.errors import (
    AdapterInUse,
    AdapterNotFound,
    ClientGone,
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
    (LoraserveError, 424, "generation"),
]


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


def _reply(request: Request, message: str, error_type: str, status: int) -> JSONResponse:
    """LoRAX's `{error, error_type}` body, or OpenAI's `{error: {message, type, param, code}}` under /v1."""
    if request.url.path.startswith("/v1/"):
        body = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
        return JSONResponse(body, status_code=status)
    return JSONResponse(error_body(message, error_type), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in error.errors()
        )
        return _reply(request, f"Input validation error: {details}", "validation", 422)

    @app.exception_handler(LoraserveError)
    async def _engine(request: Request, error: LoraserveError) -> JSONResponse:
        status, error_type = status_for(error, request.url.path)
        return _reply(request, str(error), error_type, status)
