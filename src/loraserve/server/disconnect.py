"""A non-streaming request whose client has left is aborted, not run to its end for nobody.

A streamed response notices a gone client when it next writes; a plain JSON reply writes only at the end, so the
route's wait is watched instead: the receive channel is polled for `http.disconnect` while the generation runs, and
on it the wait is cancelled, which closes the request's output streams and so aborts them in the engine (freeing
their KV blocks and adapter pins before the next step).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from loraserve.errors import ClientGone

T = TypeVar("T")
POLL_SECONDS = 0.2


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`await work`, cancelled (raising `ClientGone`) as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=POLL_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ClientGone("the client disconnected before the reply was ready")
