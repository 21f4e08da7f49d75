"""What one request may ask for, each bound a flag of `ServerConfig` and each refusal a 422 naming that flag.

The request body's size is checked first: a body over `--max-request-bytes` answers 413 before it is parsed, so a
huge body neither fills memory nor holds the event loop while JSON is decoded (plain ASGI, like the other gates).
Prompt and total tokens are the engine's (`--max-input-length`, `--max-total-tokens`), counted in a worker thread.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.config import ServerConfig
from loraserve.errors import InvalidRequest
from loraserve.server.errors import BodyTooLarge, error_response


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, BodyTooLarge(self.max_bytes))
            return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as error:  # read outside FastAPI's body parsing (which answers it in `errors`)
            if not started:
                await self._refuse(scope, receive, send, error)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: BodyTooLarge) -> None:
        await error_response(scope["path"], str(error), "request_too_large", 413)(scope, receive, send)


def check_stop_sequences(stop: list[str], config: ServerConfig) -> None:
    """LoRAX's `--max-stop-sequences`, and a length per sequence: each is matched against the text every step."""
    if len(stop) > config.max_stop_sequences:
        raise InvalidRequest(f"`stop` supports up to {config.max_stop_sequences} stop sequences "
                             f"(--max-stop-sequences). Given: {len(stop)}")
    longest = max((len(sequence) for sequence in stop), default=0)
    if longest > config.max_stop_sequence_length:
        raise InvalidRequest(f"each `stop` sequence may be at most {config.max_stop_sequence_length} characters "
                             f"(--max-stop-sequence-length). Given: one of {longest}")


def check_merged_adapters(ids: list[str], config: ServerConfig) -> None:
    """Each part of a merge is fetched and held in memory while the merge is computed."""
    if len(ids) > config.max_merged_adapters:
        raise InvalidRequest(f"`merged_adapters.ids` may name at most {config.max_merged_adapters} adapters "
                             f"(--max-merged-adapters). Given: {len(ids)}")


def check_json_schema(schema: Any, config: ServerConfig) -> None:
    """Depth first, without recursion, so that a schema nested deep enough to break a recursive walk (the
    serializer's, the grammar compiler's) is refused before anything walks it recursively; its size is checked
    once serialized (`check_json_schema_bytes`)."""
    stack = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > config.max_json_schema_depth:
            raise InvalidRequest(f"the JSON schema nests deeper than {config.max_json_schema_depth} levels "
                                 "(--max-json-schema-depth)")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def check_json_schema_bytes(serialized: str, config: ServerConfig) -> None:
    size = len(serialized.encode())
    if size > config.max_json_schema_bytes:
        raise InvalidRequest(f"the JSON schema takes {size} bytes as compact JSON; at most "
                             f"{config.max_json_schema_bytes} are compiled (--max-json-schema-bytes)")


def check_regex(pattern: str, config: ServerConfig) -> None:
    if len(pattern) > config.max_regex_length:
        raise InvalidRequest(f"the regex may be at most {config.max_regex_length} characters "
                             f"(--max-regex-length). Given: {len(pattern)}")


def check_n(n: int, config: ServerConfig) -> None:
    """OpenAI's `n`: each choice is a generation of its own."""
    if n > config.max_n:
        raise InvalidRequest(f"`n` must be <= {config.max_n} (--max-n). Given: {n}")


def check_best_of(best_of: int | None, *, sampled: bool, seeded: bool, streamed: bool, config: ServerConfig) -> int:
    """LoRAX's (TGI's) rules for `best_of`: the number of sequences to generate, 1 when it is unset."""
    if best_of is None:
        return 1
    if not 0 < best_of <= config.max_best_of:
        raise InvalidRequest(f"`best_of` must be > 0 and <= {config.max_best_of} (--max-best-of). Given: {best_of}")
    if best_of > 1 and streamed:
        raise InvalidRequest("`best_of` != 1 is not supported when streaming tokens")
    if best_of > 1 and not sampled:
        raise InvalidRequest("you must use sampling when `best_of` is > 1")
    if best_of > 1 and seeded:
        raise InvalidRequest("`seed` must not be set when `best_of` > 1")
    return best_of


def check_truncate(truncate: int | None, max_input_length: int) -> None:
    if truncate is not None and not 0 < truncate <= max_input_length:
        raise InvalidRequest(f"`truncate` must be strictly positive and at most {max_input_length} "
                             f"(--max-input-length). Given: {truncate}")
