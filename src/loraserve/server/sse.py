"""Server-sent events as LoRAX writes them: `data:<compact json>` and a blank line, no space after the colon."""

from __future__ import annotations

import json

from pydantic import BaseModel


def sse_event(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else json.dumps(
        payload, separators=(",", ":")
    )
    return f"data:{data}\n\n"
