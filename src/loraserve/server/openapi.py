"""What FastAPI cannot derive for the OpenAPI document: the events of the streamed routes.

Each streamed route documents one event (OpenAPI 3.2's `itemSchema`, as FastAPI writes it for its own event
streams) whose `data` is JSON of one of the event models, and, on the OpenAI routes, the closing `[DONE]`. The
routes build their events by hand, so FastAPI never sees those models: `install_openapi` adds them to the
document's components.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from loraserve.server.errors import ErrorResponse, OpenAIErrorResponse
from loraserve.server.lorax.schemas import StreamResponse
from loraserve.server.openai.schemas import ChatCompletionChunk, Completion

_REF = "#/components/schemas/{model}"
EVENT_MODELS: tuple[type[BaseModel], ...] = (StreamResponse, ChatCompletionChunk, Completion, ErrorResponse,
                                             OpenAIErrorResponse)


def sse_content(*models: type[BaseModel], done_marker: bool = False) -> dict:
    """The `content` of a streamed 200: events whose `data` is JSON of one of `models` (each in EVENT_MODELS), or
    `[DONE]` where `done_marker`."""
    assert all(model in EVENT_MODELS for model in models), "add the model to EVENT_MODELS"
    data: dict = {"type": "string", "contentMediaType": "application/json",
                  "contentSchema": {"anyOf": [{"$ref": _REF.format(model=model.__name__)} for model in models]}}
    if done_marker:
        data = {"type": "string", "if": {"const": "[DONE]"}, "else": data}
    event = {"type": "object", "required": ["data"],
             "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"},
                            "retry": {"type": "integer", "minimum": 0}}}
    return {"text/event-stream": {"itemSchema": event}}


def install_openapi(app: FastAPI) -> None:
    """`app.openapi()` builds FastAPI's document once, with the event models among its components."""

    derive = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = derive()  # FastAPI's, cached in app.openapi_schema: completed in place
            _, definitions = models_json_schema([(model, "serialization") for model in EVENT_MODELS],
                                                ref_template=_REF)
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in definitions["$defs"].items():
                components.setdefault(name, schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
