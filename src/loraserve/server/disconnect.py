"""Clients that left, or stopped reading: their requests are aborted, not run to their end for nobody.

A streamed response notices a gone client when it next writes; a plain JSON reply writes only at the end, so the
route's wait is watched instead: the receive channel is polled for `http.disconnect` while the generation runs, and
on it the wait is cancelled, which closes the request's output streams and so aborts them in the engine (freeing
their KV blocks and adapter pins before the next step).

A client that stays connected but reads nothing makes the server's writes wait once the socket buffers are full.
`SendTimeout` bounds each write (nginx's `send_timeout`: the time between two successful writes, not the whole
response): past it the response is ended there, which closes its output streams as above. A generation that merely
produces nothing for a while (queued behind others, or waiting for its adapter) is not idle in this sense: that is
what the request's deadline bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.errors import ClientGone

logger = logging.getLogger(__name__)
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


class _ClientStalled(Exception):
    """A write waited past the send timeout. Not an OSError (Starlette would take it for a disconnect) and not a
    `LoraserveError` (the error handlers would try to answer a response already started)."""


class SendTimeout:
    """Plain ASGI: every write to the client may wait at most `seconds`; past it the response ends unfinished (the
    server closes the connection) and the route's generators are closed, aborting their requests."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def bounded_send(message: Message) -> None:
            try:
                async with asyncio.timeout(self.seconds):
                    await send(message)
            except TimeoutError:
                raise _ClientStalled from None

        try:
            await self.app(scope, receive, bounded_send)
        except _ClientStalled:
            logger.warning("%s: the client read nothing for %g s (--stream-idle-timeout); ending the response",
                           scope["path"], self.seconds)
