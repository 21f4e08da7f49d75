"""`Client`: the blocking transport over httpx2. Bodies, parsing and retry decisions live in `_protocol`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeVar, Unpack, overload

import httpx2

from loraserve.client._protocol import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    HEALTH_PATH,
    Call,
    EventStream,
    ReadinessProbe,
    Settings,
    chat_call,
    chat_events,
    generate_call,
    generate_events,
    parse_json,
    parse_response,
    translated_errors,
)
from loraserve.client.errors import error_from_body
from loraserve.client.types import ChatParameters, GenerateParameters, Response, StreamResponse

T = TypeVar("T")


class Client:
    """Blocking client of a loraserve (or LoRAX) server.

    >>> client = Client("http://127.0.0.1:3000")
    >>> client.generate("Why is the sky blue?", adapter_id="some/adapter", max_new_tokens=32).generated_text

    `timeout` bounds each read and write (long, because a cold adapter is downloaded before the first token);
    `connect_timeout` bounds connecting. 429, 503 and failed connections are retried `max_retries` times.
    """

    def __init__(self, base_url: str, api_token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 max_retries: int = DEFAULT_MAX_RETRIES, headers: Mapping[str, str] | None = None,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        self._settings = Settings.create(base_url, api_token, timeout, connect_timeout, max_retries, headers)
        self._http = httpx2.Client(**self._settings.http_options())

    def generate(self, prompt: str, **parameters: Unpack[GenerateParameters]) -> Response:
        """Generate a completion of `prompt` (POST /generate)."""
        return parse_response(self._request(generate_call(prompt, parameters, stream=False)))

    def generate_stream(self, prompt: str, **parameters: Unpack[GenerateParameters]) -> Iterator[StreamResponse]:
        """Yield one event per generated token (POST /generate_stream); the last carries the full text."""
        yield from self._events(generate_call(prompt, parameters, stream=True), generate_events())

    @overload
    def chat(self, messages: list[dict[str, Any]], stream: Literal[False] = False,
             **parameters: Unpack[ChatParameters]) -> dict[str, Any]: ...

    @overload
    def chat(self, messages: list[dict[str, Any]], stream: Literal[True],
             **parameters: Unpack[ChatParameters]) -> Iterator[dict[str, Any]]: ...

    def chat(self, messages: list[dict[str, Any]], stream: bool = False,
             **parameters: Unpack[ChatParameters]) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI chat completion (POST /v1/chat/completions): the reply, or its chunks up to `[DONE]`."""
        call = chat_call(messages, parameters, stream)
        if stream:
            return self._events(call, chat_events())
        return parse_json(self._request(call))

    def wait_until_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        """Poll GET /health until it answers 200; raises APITimeoutError after `timeout` seconds."""
        probe = ReadinessProbe(self._settings.base_url, timeout, interval)
        while True:
            outcome: httpx2.Response | Exception
            try:
                outcome = self._http.get(HEALTH_PATH, timeout=probe.attempt_timeout())
            except httpx2.TransportError as error:
                outcome = error
            if probe.ready(outcome):
                return
            time.sleep(probe.pause())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, call: Call) -> bytes:
        with translated_errors():
            response = self._send(call)
            try:
                return response.read()
            finally:
                response.close()

    def _events(self, call: Call, events: EventStream[T]) -> Iterator[T]:
        with translated_errors():
            response = self._send(call)
            try:
                for line in response.iter_lines():
                    item = events.feed(line)
                    if item is not None:
                        yield item
                    if events.finished:
                        return
                events.finish()
            finally:
                response.close()

    def _send(self, call: Call) -> httpx2.Response:
        """A successful response with its body unread; 429/503/connection failures are retried as the policy says."""
        request = call.build(self._http)
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=True)
            except httpx2.TransportError as error:
                delay = self._settings.retry.delay(attempt, error)
                if delay is None:
                    raise
            else:
                if response.is_success:
                    return response
                delay = self._settings.retry.delay(attempt, response)
                body = response.read()
                response.close()
                if delay is None:
                    raise error_from_body(response.status_code, body)
            time.sleep(delay)
            attempt += 1
