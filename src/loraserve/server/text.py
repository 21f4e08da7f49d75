"""Text at the HTTP boundary: request bodies must hold valid Unicode, and response headers only what HTTP carries.

JSON may spell a lone surrogate (`"\\ud800"`); Python decodes it into a `str` that no tokenizer, template or encoder
accepts, so it would fail deep inside a request. Every request body is checked once, as it is validated, and
answers 422 naming the field. Header values that echo the request (an adapter id) are percent-encoded outside
printable ASCII, so a non-Latin-1 or multi-line id cannot fail a reply that is already computed.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, model_validator
from pydantic_core import PydanticCustomError

_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")  # `%` is encoded, so decoding is exact


def header_value(text: str) -> str:
    """`text` as a header value: printable ASCII as it is, everything else (and `%`) percent-encoded as UTF-8."""
    return quote(text, safe=_HEADER_SAFE)


def _valid_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def invalid_unicode_at(value: Any) -> str | None:
    """The location (`messages.0.content`) of the first string in a decoded JSON value that is not valid Unicode;
    None if every string is. Walked without recursion: the value may nest as deep as the JSON parser allowed."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not _valid_unicode(item):
                return where or "the body"
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and not _valid_unicode(key):
                    return f"a key in {where or 'the body'}"
                stack.append((child, f"{where}.{key}" if where else str(key)))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{index}" if where else str(index)) for index, child in enumerate(item))
    return None


class RequestBody(BaseModel):
    """The base of every top-level request body (nested models need not repeat the walk)."""

    @model_validator(mode="before")
    @classmethod
    def _unicode_only(cls, data: Any) -> Any:
        where = invalid_unicode_at(data)
        if where is not None:
            raise PydanticCustomError("invalid_unicode", "{where} holds a lone surrogate, which is not valid Unicode "
                                      "text", {"where": where})
        return data
