"""API keys and tenants: who may call the server, which adapters each caller may use, and which Hub token a request
carries.

Keys come from `--api-key` (repeatable; env `LORASERVE_API_KEY`, comma-separated) and `--api-keys-file`, a JSON
file `{"keys": [{"key": "...", "tenant": "acme", "adapters": ["acme/", "s3://acme-bucket/"], "sources": ["hub"]}]}`
where `adapters` (id or name prefixes) and `sources` are optional limits. With any key configured, every route but
`/health` (and `/metrics`, unless `--metrics-require-key`) and the API docs needs `Authorization: Bearer <key>`: 401
with a JSON body otherwise. A caller asking for an adapter outside its limits is told it does not exist, exactly as
for a missing one, and `/v1/models` and `/adapters` list only what it may use.

Hub tokens: without keys, a request's token is its `api_token`, else its `Authorization: Bearer` header, else the
server's HF_TOKEN where the operator lends it. With keys on, the header authenticates the caller and is never sent to
the Hub: the token is `api_token`, else the server's own. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from loraserve.engine.api import AdapterInfo, AdapterRef
from loraserve.errors import AdapterNotFound
from loraserve.server.errors import error_response

OPEN_PATHS = frozenset({"/health", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"})


@dataclass(frozen=True)
class Principal:
    """A caller: its tenant and, where limited, the adapter id prefixes and sources it may use (None: any)."""

    tenant: str
    adapter_prefixes: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None

    def may_use(self, adapter_id: str, source: str) -> bool:
        if self.sources is not None and source not in self.sources:
            return False
        return self.adapter_prefixes is None or adapter_id.startswith(self.adapter_prefixes)


class KeyRing:
    def __init__(self, principals: dict[str, Principal]) -> None:
        self._principals = principals

    @classmethod
    def from_config(cls, keys: tuple[str, ...], keys_file: Path | None) -> KeyRing:
        principals = {key: Principal("default") for key in keys}
        if keys_file is not None:
            principals.update(_read_keys_file(keys_file))
        return cls(principals)

    @property
    def enabled(self) -> bool:
        return bool(self._principals)

    def lookup(self, authorization: str | None) -> Principal | None:
        """The caller a `Bearer` header names; None for a missing or unknown key (every key is compared)."""
        presented = _bearer(authorization)
        found = None
        for key, principal in self._principals.items():
            if hmac.compare_digest(key.encode(), (presented or "").encode()):
                found = principal
        return found if presented else None


def _read_keys_file(path: Path) -> dict[str, Principal]:
    try:
        entries = json.loads(path.read_text())["keys"]
        principals = {}
        for entry in entries:
            adapters, sources = entry.get("adapters"), entry.get("sources")
            principals[str(entry["key"])] = Principal(str(entry.get("tenant", "default")),
                                                      tuple(adapters) if adapters is not None else None,
                                                      tuple(sources) if sources is not None else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"--api-keys-file {path}: expected {{\"keys\": [{{\"key\", \"tenant\", \"adapters\"?, "
                         f"\"sources\"?}}]}} ({type(error).__name__})") from None
    if any(not key for key in principals):
        raise ValueError(f"--api-keys-file {path}: a key must not be empty")
    return principals


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None


class KeyGate:
    """401 for every keyed route without a valid key; the caller's `Principal` goes into the request's state.
    Plain ASGI, like the ready gate, so streamed responses are not wrapped."""

    def __init__(self, app: ASGIApp, keys: KeyRing, metrics_open: bool) -> None:
        self.app = app
        self.keys = keys
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_open else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        principal = self.keys.lookup(headers.get("authorization"))
        if principal is None:
            path = scope["path"]
            response = error_response(path, "a valid API key is required: Authorization: Bearer <key>",
                                      "invalid_api_key" if path.startswith("/v1/") else "unauthorized", 401,
                                      headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def principal_of(request: Request) -> Principal | None:
    return getattr(request.state, "principal", None)


def request_token(api_token: str | None, authorization: str | None, server_token: str | None) -> str | None:
    """Without keys: the request's `api_token`, else its `Authorization: Bearer` header, else the server's token
    where it is lent (LoRAX drops the header: its issue 541)."""
    return api_token or _bearer(authorization) or server_token


def hub_token(request: Request, api_token: str | None) -> str | None:
    """The one token used for every Hub call the request causes (see the module docstring)."""
    engine = request.app.state.engine
    if request.app.state.keys.enabled:
        return api_token or engine.lent_token(always=True)
    return request_token(api_token, request.headers.get("authorization"), engine.lent_token())


def check_adapter(request: Request, ref: AdapterRef | None) -> AdapterRef | None:
    """`ref` if the caller may use it (every part of a merge); else the missing-adapter error."""
    principal = principal_of(request)
    if ref is None or principal is None:
        return ref
    for adapter_id in ref.merge.adapter_ids if ref.merge is not None else (ref.adapter_id,):
        if not principal.may_use(adapter_id, ref.source):
            raise AdapterNotFound(f"adapter {adapter_id!r} not found")
    return ref


def visible(request: Request, info: AdapterInfo) -> bool:
    """Whether the caller may see `info` in a listing (by its id or any of its names)."""
    principal = principal_of(request)
    return principal is None or any(principal.may_use(i, info.source) for i in (info.adapter_id, *info.names))
