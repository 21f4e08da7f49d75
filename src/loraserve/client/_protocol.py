"""Everything `Client` and `AsyncClient` share: settings, request bodies, response and SSE parsing, retry and
readiness decisions. The two clients only move bytes, so their behaviour cannot drift apart."""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx2
import pydantic

from loraserve.client.errors import (
    APIConnectionError,
    APITimeoutError,
    IncompleteGenerationError,
    LoraserveError,
    error_from_event,
)
from loraserve.client.types import ChatParameters, GenerateParameters, Response, StreamResponse

T = TypeVar("T")
M = TypeVar("M", bound=pydantic.BaseModel)

# The first request for an adapter may download it before the first token: reads get minutes, connects seconds.
DEFAULT_TIMEOUT = 600.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_RETRIES = 3
HEALTH_PATH = "/health"
_RETRY_STATUSES = frozenset({429, 503})
# Raised by `send` before any response byte was read, so the server has produced nothing a retry could duplicate.
_RETRY_ERRORS = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout, httpx2.RemoteProtocolError,
                 httpx2.ReadError, httpx2.WriteError)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped; a server's Retry-After wins (up to `retry_after_max`)."""

    max_retries: int
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    retry_after_max: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")

    def delay(self, attempt: int, outcome: httpx2.Response | Exception) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None if this outcome must not be retried."""
        if attempt >= self.max_retries:
            return None
        if isinstance(outcome, httpx2.Response):
            if outcome.status_code not in _RETRY_STATUSES:
                return None
            retry_after = _retry_after(outcome.headers.get("retry-after"))
            if retry_after is not None:
                return min(retry_after, self.retry_after_max)
        elif not isinstance(outcome, _RETRY_ERRORS):
            return None
        return min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now; it may be a number of seconds or an HTTP date."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class Settings:
    base_url: str
    headers: dict[str, str]
    timeout: httpx2.Timeout
    retry: RetryPolicy

    @classmethod
    def create(cls, base_url: str, api_token: str | None, timeout: float, connect_timeout: float, max_retries: int,
               headers: Mapping[str, str] | None) -> Settings:
        """The token falls back to LORASERVE_API_TOKEN, then HF_TOKEN (the server uses it for private adapters); an
        Authorization header given in `headers` wins over all of them."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        token = api_token or os.environ.get("LORASERVE_API_TOKEN") or os.environ.get("HF_TOKEN")
        merged = dict(headers or {})
        if token and not any(name.lower() == "authorization" for name in merged):
            merged["Authorization"] = f"Bearer {token}"
        return cls(base_url.rstrip("/"), merged, httpx2.Timeout(timeout, connect=connect_timeout),
                   RetryPolicy(max_retries))

    def http_options(self) -> dict[str, Any]:
        """Constructor arguments of httpx2.Client / httpx2.AsyncClient."""
        return {"base_url": self.base_url, "headers": self.headers, "timeout": self.timeout}


@dataclass(frozen=True)
class Call:
    """One API request, independent of the transport that sends it."""

    method: str
    path: str
    body: dict[str, Any]

    def build(self, http: httpx2.Client | httpx2.AsyncClient) -> httpx2.Request:
        return http.build_request(self.method, self.path, json=self.body)


def generate_call(prompt: str, parameters: GenerateParameters, stream: bool) -> Call:
    """POST /generate or /generate_stream with LoRAX's body. Details default to on, as in lorax-client."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    sent = {name: value for name, value in parameters.items() if value is not None}
    if "stop_sequences" in sent:
        if "stop" in sent:
            raise ValueError("give `stop` or its lorax-client name `stop_sequences`, not both")
        sent["stop"] = sent.pop("stop_sequences")
    sent.setdefault("details", True)
    return Call("POST", "/generate_stream" if stream else "/generate", {"inputs": prompt, "parameters": sent})


def chat_call(messages: list[dict[str, Any]], parameters: ChatParameters, stream: bool) -> Call:
    """POST /v1/chat/completions with OpenAI's body."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    sent = {name: value for name, value in parameters.items() if value is not None}
    return Call("POST", "/v1/chat/completions", {"messages": messages, "stream": stream, **sent})


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as error:
        raise LoraserveError(f"server sent invalid JSON: {body[:200]!r}") from error


def _validated(model: type[M], payload: Any) -> M:
    """A typed response; a body of the wrong shape (not a loraserve/LoRAX server?) is a LoraserveError too."""
    try:
        return model.model_validate(payload)
    except pydantic.ValidationError as error:
        raise LoraserveError(f"unexpected {model.__name__} from server: {error}") from error


def parse_response(body: bytes) -> Response:
    return _validated(Response, parse_json(body))


class EventStream(Generic[T]):
    """Turns SSE lines into items, one line at a time, so a sync and an async loop can share it.

    An `{"error": ...}` event raises; `[DONE]` or an item for which `is_last` is true ends the stream; a stream
    that ends without either was cut off, and `finish` raises IncompleteGenerationError.
    """

    def __init__(self, parse: Callable[[dict[str, Any]], T], is_last: Callable[[T], bool] | None = None) -> None:
        self._parse = parse
        self._is_last = is_last
        self.finished = False

    def feed(self, line: str) -> T | None:
        if not line.startswith("data:"):
            return None  # blank separators, `:` keep-alives, `event:`/`id:` fields
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            self.finished = True
            return None
        payload = parse_json(data.encode())
        if isinstance(payload, dict) and "error" in payload:
            raise error_from_event(payload)
        item = self._parse(payload)
        if self._is_last is not None and self._is_last(item):
            self.finished = True
        return item

    def finish(self) -> None:
        if not self.finished:
            raise IncompleteGenerationError("the stream ended before its final event")


def generate_events() -> EventStream[StreamResponse]:
    """LoRAX streams have no [DONE]: the event carrying `generated_text` is the last."""
    return EventStream(lambda payload: _validated(StreamResponse, payload), lambda event: event.generated_text is not None)


def chat_events() -> EventStream[dict[str, Any]]:
    return EventStream(dict)


@contextmanager
def translated_errors() -> Iterator[None]:
    """httpx2's exceptions become LoraserveError subclasses, so callers catch one hierarchy."""
    try:
        yield
    except httpx2.TimeoutException as error:
        raise APITimeoutError(f"timed out: {error!r}") from error
    except httpx2.RequestError as error:
        raise APIConnectionError(f"connection failed: {error!r}") from error


class ReadinessProbe:
    """The decisions of `wait_until_ready`: how long each probe may take, whether it succeeded, when to give up."""

    def __init__(self, base_url: str, timeout: float, interval: float) -> None:
        if timeout <= 0 or interval <= 0:
            raise ValueError("timeout and interval must be positive")
        self._base_url = base_url
        self._timeout = timeout
        self._interval = interval
        self._deadline = time.monotonic() + timeout
        self._last = "no answer yet"

    def attempt_timeout(self) -> float:
        return max(0.1, min(5.0, self._deadline - time.monotonic()))

    def ready(self, outcome: httpx2.Response | Exception) -> bool:
        if isinstance(outcome, httpx2.Response):
            if outcome.status_code == 200:
                return True
            self._last = f"HTTP {outcome.status_code}"
        else:
            self._last = repr(outcome)
        return False

    def pause(self) -> float:
        """Seconds to sleep before the next probe; raises APITimeoutError once the deadline has passed."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise APITimeoutError(f"{self._base_url}{HEALTH_PATH} not ready after {self._timeout:g} s "
                                  f"(last: {self._last})")
        return min(self._interval, remaining)
