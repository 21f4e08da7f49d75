"""`response_format` on every generation route -> the grammar the output must match.

One shape serves LoRAX's native form and OpenAI's:

    {"type": "text"}                                        no constraint
    {"type": "json_object"}                                 any JSON object
    {"type": "json_object", "schema": {...}}                LoRAX's way of asking for a schema
    {"type": "json_schema", "schema": {...}}                LoRAX's documented form
    {"type": "json_schema", "json_schema": {"name": "...", "schema": {...}, "strict": true}}   OpenAI's form
    {"type": "regex", "pattern": "..."}                     ours: the output fullmatches the pattern

Unlike LoRAX's native route, `{"type": "text"}` means no constraint (LoRAX forces JSON for any object it gets).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraserve.config import ServerConfig
from loraserve.errors import InvalidRequest
from loraserve.sampling.grammar import GrammarSpec
from loraserve.server.limits import check_json_schema, check_json_schema_bytes, check_regex


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema", "regex"]
    inline_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    json_schema: JsonSchemaFormat | None = None
    pattern: str | None = None


def grammar_for(response_format: ResponseFormat | None, config: ServerConfig) -> GrammarSpec | None:
    """The grammar a `response_format` asks for; None for no constraint. Raises `InvalidRequest` (422) when the
    format lacks what its type needs or is over the server's limits (`limits.check_json_schema`, `check_regex`); a
    schema llguidance cannot enforce is refused when the request is made."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "regex":
        if not response_format.pattern:
            raise InvalidRequest('response_format of type "regex" needs a non-empty "pattern"')
        check_regex(response_format.pattern, config)
        return GrammarSpec.regex(response_format.pattern)
    schema = response_format.inline_schema
    if schema is None and response_format.json_schema is not None:
        schema = response_format.json_schema.json_schema
    if schema is not None:
        check_json_schema(schema, config)
        spec = GrammarSpec.json_schema(schema)
        check_json_schema_bytes(spec.source, config)
        return spec
    if response_format.type == "json_schema":
        raise InvalidRequest('response_format of type "json_schema" needs a schema ("schema" or "json_schema.schema")')
    return GrammarSpec.json_object()
