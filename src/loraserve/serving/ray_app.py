"""loraserve under Ray Serve: N replicas of the normal server app, and an ingress that routes by adapter.

    client -> Ray's HTTP proxy -> LoraserveIngress (FastAPI, forwards every route)
                                    |  handle.options(multiplexed_model_id="<source>:<adapter_id>")
                                    v
                                  LoraserveReplica x N (each: the full `loraserve.server.app` app + one engine)

Each replica builds the same FastAPI app `loraserve serve` runs (every LoRAX and OpenAI route, streaming, errors,
metrics) and calls it in-process: the ingress hands over method, path, headers and body, and gets back the status,
the headers and the body chunks as a Ray streaming generator, so SSE streams stay streams.

Adapter affinity is Ray Serve's model multiplexing. The ingress reads the adapter from the JSON body
(`parameters.adapter_id` on `/generate`, `/generate_stream` and `/`; `model` on `/v1/completions` and
`/v1/chat/completions`; `adapter_id` on `POST /adapters/preload`) and calls the replica handle with
`.options(multiplexed_model_id=...)`; Ray's router then prefers a replica that already holds that id, else the one
holding the fewest. The replica deployment uses `AdapterAffinityRouter`, Ray's default policy plus one rule: an
adapter counts as held by a replica from the moment the router sends it there, not only once the replica's report
has come back through the controller (0.1-0.5 s later), so requests for a new adapter that follow each other
closely do not each load it on another replica. On the replica, the `@serve.multiplexed` loader only makes the adapter host-resident through the
replica's own app (`POST /adapters/preload`, in-process) and returns a token; it holds no weights and Ray's eviction
of a token unloads nothing: the engine's tiered cache stays the one place that decides residency. Ray's per-replica
LRU is sized to the engine's own device capacity (`EngineInfo.max_adapters`) unless `max_adapters_per_replica`
says otherwise. Base-model requests, merged adapters and the management routes go to any replica; vLLM's
`/v1/load_lora_adapter`, `/v1/unload_lora_adapter` and `POST /adapters/unload` go to every replica (a name
registered at run time must exist wherever requests may land); `GET /adapters` asks every replica and tags each
entry with its replica id.

Entry points:
  - `build_app(engine_config, server_config, num_replicas=..., autoscaling_config=...)`: the bound application.
  - `serve run loraserve.serving.ray_app:app`: the same, configured from the environment (loraserve's FLAG_ENV
    variables: MODEL_ID, DTYPE, ...); `serve run loraserve.serving.ray_app:app_builder model_id=... num_replicas=2`
    takes the same names as `key=value` arguments.
  - `serve_with_ray(engine_config, server_config, replicas)`: what `loraserve serve --ray-replicas N` runs.

The replicas run the engine's step loop on a thread of their own (a Ray actor's main thread belongs to Ray).

No `from __future__ import annotations` here: Ray's class-based FastAPI views resolve the route annotations
(`request: Request`) at run time, and string annotations made FastAPI read `request` as a query parameter.
"""

import asyncio
import contextvars
import dataclasses
import json
import logging
import random
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

if TYPE_CHECKING:  # the ingress process never needs the engine stack; replicas import it when they start
    from ray.serve import Application

    from loraserve.config import EngineConfig, ServerConfig

logger = logging.getLogger(__name__)

APP_NAME = "loraserve"
LORAX_GENERATE_PATHS = ("/generate", "/generate_stream", "/")
OPENAI_GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
BROADCAST_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters/unload")
PRELOAD_PATH = "/adapters/preload"
_HTTP_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


# ---------------------------------------------------------------------------------------------------------------
# Calling an ASGI app in-process


async def asgi_call(app: Callable, method: str, path: str, query_string: bytes, headers: list[tuple[str, str]],
                    body: bytes) -> AsyncIterator[dict | bytes]:
    """Run one HTTP request through `app`: yields `{"status", "headers"}` first, then the body chunks as they are
    sent. Closing the iterator early tells the app the client disconnected (its streams abort their requests)."""
    sent: asyncio.Queue[dict | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_pending = True

    async def receive() -> dict:
        nonlocal body_pending
        if body_pending:
            body_pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method.upper(), "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query_string,
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "state": {},
    }

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 - Starlette re-raises after it sent its 500; a missing reply is handled below
            logger.exception("the app failed on %s %s", method, path)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    started = finished = False
    try:
        while not finished:
            message = await sent.get()
            if message is None:
                if not started:
                    yield {"status": 500, "headers": [("content-type", "application/json")]}
                    yield json.dumps({"error": "the app ended without a response", "error_type": "internal"}).encode()
                break
            if message["type"] == "http.response.start":
                started = True
                yield {"status": message["status"],
                       "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                finished = not message.get("more_body", False)
    finally:
        disconnected.set()
        if not task.done():
            try:  # let the app see the disconnect and clean up (abort its request), then stop waiting
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            except (TimeoutError, asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()


async def asgi_call_once(app: Callable, method: str, path: str, query_string: bytes = b"",
                         headers: list[tuple[str, str]] | None = None,
                         body: bytes = b"") -> tuple[int, list[tuple[str, str]], bytes]:
    """`asgi_call`, collected: (status, headers, body)."""
    status, response_headers, chunks = 500, [], []
    async for item in asgi_call(app, method, path, query_string, headers or [], body):
        if isinstance(item, dict):
            status, response_headers = item["status"], item["headers"]
        else:
            chunks.append(item)
    return status, response_headers, b"".join(chunks)


class _Lifespan:
    """Drives an ASGI app's lifespan (startup, later shutdown) the way uvicorn would."""

    def __init__(self, app: Callable) -> None:
        self._app = app
        self._inbox: asyncio.Queue[dict] = asyncio.Queue()
        self._outbox: asyncio.Queue[dict] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._task = asyncio.create_task(self._app(scope, self._inbox.get, self._outbox.put))
        await self._inbox.put({"type": "lifespan.startup"})
        reply = await self._outbox.get()
        if reply["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the app did not start: {reply.get('message', reply)}")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(self._outbox.get(), timeout=60)


# ---------------------------------------------------------------------------------------------------------------
# Which adapter a request names


@dataclasses.dataclass(frozen=True)
class AdapterTarget:
    """The adapter a request names: `key` is the multiplexed model id Ray routes on."""

    adapter_id: str
    source: str | None  # None: the replica's default source (--adapter-source)
    api_token: str | None

    def key(self, default_source: str) -> str:
        return f"{self.source or default_source}:{self.adapter_id}"

    def preload_body(self) -> dict:
        body: dict[str, Any] = {"adapter_id": self.adapter_id}
        if self.source:
            body["adapter_source"] = self.source
        if self.api_token:
            body["api_token"] = self.api_token
        return body


def adapter_of(method: str, path: str, body: bytes, base_model_name: str | None) -> AdapterTarget | None:
    """The single adapter a request is for, or None (the base model, a merge, a management route, a body that does
    not parse: the replica's app answers those itself)."""
    if method.upper() != "POST" or path not in (*LORAX_GENERATE_PATHS, *OPENAI_GENERATE_PATHS, PRELOAD_PATH):
        return None
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    if path in OPENAI_GENERATE_PATHS:
        model = payload.get("model")
        if not isinstance(model, str) or model in ("", base_model_name):
            return None
        return AdapterTarget(model, _str_or_none(payload.get("adapter_source")), _str_or_none(payload.get("api_token")))
    fields = payload if path == PRELOAD_PATH else payload.get("parameters")
    if not isinstance(fields, dict):
        return None
    adapter_id = fields.get("adapter_id")
    if not isinstance(adapter_id, str) or not adapter_id or fields.get("merged_adapters"):
        return None
    return AdapterTarget(adapter_id, _str_or_none(fields.get("adapter_source")), _str_or_none(fields.get("api_token")))


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


# ---------------------------------------------------------------------------------------------------------------
# Routing: Ray's multiplexing, plus what this router itself just decided


class AdapterAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Ray Serve's default policy (power of two choices among the replicas that hold the request's multiplexed id,
    else among those holding the fewest ids) with one change: a new adapter's replica counts as holding it from the
    moment this router sends it there.

    Ray learns what a replica holds from the replica itself (pushed every 0.1 s, then broadcast by the controller),
    so without this, the requests for a new adapter that arrive in the next few hundred milliseconds (a burst, or
    short requests one after the other) each go to the replica with the fewest adapters, and every replica ends up
    loading it. The claim is kept for `claim_s` seconds after the last request routed on it, or until the
    controller's view lists the adapter somewhere, whichever comes first; a replica that refuses requests (it is at
    `max_ongoing_requests`) still lets Ray's fallback spill the adapter to another replica.
    """

    def initialize_state(self, claim_s: float = 10.0) -> None:
        self._claim_s = claim_s
        self._claims: dict[str, tuple[ReplicaID, float]] = {}

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        key = pending_request.metadata.multiplexed_model_id
        if key:
            self._claims[key] = (replica_id, time.monotonic())
            self._claim(key, replica_id, self._replicas.values())

    def _claim(self, key: str, replica_id: ReplicaID, replicas: Any) -> None:
        if self._multiplexed_model_id_to_replica_ids.get(key):
            return  # the controller's view has it: that is the truth
        for replica in replicas:
            if replica.replica_id == replica_id:
                self._multiplexed_model_id_to_replica_ids[key].add(replica_id)
                replica.multiplexed_model_ids.add(key)  # counts for "fewest adapters" too
                return

    def _update_multiplexed_model_ids_with_replicas(self, replicas: list[RunningReplica]) -> None:
        super()._update_multiplexed_model_ids_with_replicas(replicas)
        now = time.monotonic()
        for key, (replica_id, since) in list(self._claims.items()):
            if now - since > self._claim_s:
                del self._claims[key]
            else:
                self._claim(key, replica_id, replicas)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            candidate_ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            candidate_ids = self.apply_locality_routing(pending_request=pending_request)
        chosen = random.sample(sorted(candidate_ids, key=str), k=min(2, len(candidate_ids)))
        return [[self._replicas[replica_id] for replica_id in chosen]] if chosen else []


# ---------------------------------------------------------------------------------------------------------------
# The replica: one engine, the whole app


_PRELOAD: contextvars.ContextVar[tuple[AdapterTarget, list[tuple[str, str]]]] = contextvars.ContextVar("preload")


class AdapterPreloadFailed(Exception):
    """The replica's app refused to preload an adapter; the request itself then answers with the app's error."""


@dataclasses.dataclass(frozen=True)
class ResidentAdapter:
    """What Ray's multiplexing LRU holds for an adapter: a token, not weights. Evicting it unloads nothing."""

    key: str
    tier: str


class LoraserveReplica:
    """One base model and its engine, serving the full loraserve app in-process."""

    async def __init__(self, engine_config: "EngineConfig", server_config: "ServerConfig",
                       max_adapters_per_replica: int | None = None, torch_threads: int | None = None) -> None:
        import torch

        from loraserve.engine.api import AsyncEngine
        from loraserve.server.app import build_app as build_server_app

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # the default start_engine: the step loop on a thread of its own
        self.app = build_server_app(lambda: AsyncEngine.from_config(engine_config), server_config)
        self._lifespan = _Lifespan(self.app)
        await self._lifespan.startup()
        while self.app.state.engine is None:  # loading in the app's background thread; a failure ends the process
            await asyncio.sleep(0.05)
        info = self.app.state.engine.info()
        self.model_name = info.model_name
        self.adapter_source = info.adapter_source
        self.max_adapters = max_adapters_per_replica or info.max_adapters
        self._load_adapter = None
        if info.lora_enabled and self.max_adapters > 0:
            async def load_adapter(key: str) -> ResidentAdapter:
                return await self._preload(key)

            # set per instance: the capacity is the engine's own, known only once it is loaded
            self._load_adapter = serve.multiplexed(max_num_models_per_replica=self.max_adapters)(load_adapter)
            self._multiplexed_function = load_adapter
        logger.info("replica %s serves %s (%d adapters per replica)", self.replica_id, self.model_name,
                    self.max_adapters)

    def check_health(self) -> None:
        engine = self.app.state.engine
        if engine is None or not engine.is_running:
            raise RuntimeError("the engine's step loop is not running")

    def __del__(self) -> None:
        app = getattr(self, "app", None)
        engine = app.state.engine if app is not None else None
        if engine is not None:
            engine.shutdown()

    async def _preload(self, key: str) -> ResidentAdapter:
        target, headers = _PRELOAD.get()
        auth = [(name, value) for name, value in headers if name.lower() == "authorization"]
        status, _, body = await asgi_call_once(
            self.app, "POST", PRELOAD_PATH, headers=[("content-type", "application/json"), *auth],
            body=json.dumps(target.preload_body()).encode())
        if status != 200:
            raise AdapterPreloadFailed(f"{key}: {status} {body[:500]!r}")
        return ResidentAdapter(key, json.loads(body).get("tier", "host"))

    async def _ensure_adapter(self, target: AdapterTarget | None, headers: list[tuple[str, str]]) -> None:
        key = serve.get_multiplexed_model_id()
        if not key or target is None or self._load_adapter is None:
            return
        token = _PRELOAD.set((target, headers))
        try:
            await self._load_adapter(key)
        except AdapterPreloadFailed as error:  # the request runs anyway and answers the app's own error
            logger.info("adapter %s not loaded on replica %s: %s", key, self.replica_id, error)
        finally:
            _PRELOAD.reset(token)

    async def forward(self, method: str, path: str, query_string: bytes, headers: list[tuple[str, str]],
                      body: bytes, target: AdapterTarget | None = None) -> AsyncIterator[dict | bytes]:
        """A streaming Ray method: `{"status", "headers"}`, then the body chunks."""
        await self._ensure_adapter(target, headers)
        async for item in asgi_call(self.app, method, path, query_string, headers, body):
            yield item

    async def call(self, method: str, path: str, query_string: bytes = b"",
                   headers: list[tuple[str, str]] | None = None,
                   body: bytes = b"") -> tuple[int, list[tuple[str, str]], bytes]:
        return await asgi_call_once(self.app, method, path, query_string, headers or [], body)

    def multiplexed_ids(self) -> list[str]:
        """The adapter keys Ray's router believes this replica holds (its multiplexing LRU, least recent first)."""
        wrapper = getattr(getattr(self, "_multiplexed_function", None), "__serve_multiplex_wrapper", None)
        return list(wrapper.models) if wrapper is not None else []

    async def describe(self) -> dict:
        """This replica's id, base model and adapter inventory (`GET /adapters` of its own app)."""
        status, _, body = await asgi_call_once(self.app, "GET", "/adapters")
        inventory = json.loads(body) if status == 200 else {"adapters": [], "error": body.decode(errors="replace")}
        return {"replica_id": self.replica_id, "model_name": self.model_name, "adapter_source": self.adapter_source,
                "max_adapters_per_replica": self.max_adapters, "multiplexed_ids": self.multiplexed_ids(),
                "inventory": inventory}


# ---------------------------------------------------------------------------------------------------------------
# The ingress: every route, forwarded


ingress_api = FastAPI(title="loraserve (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)


class _Relayed(StreamingResponse):
    """A replica's response, relayed chunk by chunk with its own status and headers (content-length included)."""

    def __init__(self, status: int, headers: list[tuple[str, str]], chunks: AsyncIterator[bytes]) -> None:
        super().__init__(chunks, status_code=status)
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


@serve.ingress(ingress_api)
class LoraserveIngress:
    def __init__(self, replicas: DeploymentHandle, default_adapter_source: str) -> None:
        self.replicas = replicas
        self.default_adapter_source = default_adapter_source
        self._base_model_name: str | None = None

    async def _model_name(self) -> str:
        if self._base_model_name is None:
            self._base_model_name = (await self.replicas.describe.remote())["model_name"]
        return self._base_model_name

    @ingress_api.get("/adapters")
    async def adapters(self) -> dict:
        """Every replica's inventory: `adapters` lists each replica's entries tagged with `replica_id`;
        `replicas` has each replica's own totals and the adapter keys Ray routes to it."""
        replies = await self.replicas.broadcast("describe").results_async(return_exceptions=True)
        replicas, adapters = [], []
        for reply in replies:
            if isinstance(reply, BaseException):
                replicas.append({"error": repr(reply)})
                continue
            inventory = dict(reply.pop("inventory"))
            for entry in inventory.pop("adapters", []):
                adapters.append({**entry, "replica_id": reply["replica_id"]})
            replicas.append({**reply, **inventory})
        replicas.sort(key=lambda r: r.get("replica_id", ""))
        return {"adapters": adapters, "replicas": replicas}

    @ingress_api.api_route("/{path:path}", methods=_HTTP_METHODS, response_model=None)
    async def forward(self, request: Request, path: str) -> Response:
        method, path = request.method, request.url.path
        body = await request.body()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        query = request.url.query.encode()
        if method == "POST" and path in BROADCAST_PATHS:
            return await self._broadcast(method, path, query, headers, body)
        base = await self._model_name() if method == "POST" and path in OPENAI_GENERATE_PATHS else None
        target = adapter_of(method, path, body, base)
        handle = self.replicas.options(stream=True)
        if target is not None:
            handle = self.replicas.options(stream=True, multiplexed_model_id=target.key(self.default_adapter_source))
        stream = handle.forward.remote(method, path, query, headers, body, target)
        try:
            head = await stream.__anext__()
        except Exception as error:  # noqa: BLE001 - no replica could take it (dead, draining): answer like LoRAX
            logger.exception("forwarding %s %s failed", method, path)
            return JSONResponse({"error": f"no replica answered: {error}", "error_type": "unhealthy"},
                                status_code=503)

        async def chunks() -> AsyncIterator[bytes]:
            done = False
            try:
                async for chunk in stream:
                    yield chunk
                done = True
            finally:
                if not done:  # the client went away: stop the replica's stream (its request is aborted)
                    stream.cancel()

        return _Relayed(head["status"], head["headers"], chunks())

    async def _broadcast(self, method: str, path: str, query: bytes, headers: list[tuple[str, str]],
                         body: bytes) -> Response:
        """Run a management call on every replica; answer the first success, else the most telling error (a
        conflict or a refusal over a plain "not found")."""
        replies = await self.replicas.broadcast("call", method, path, query, headers, body).results_async(
            return_exceptions=True)
        answered = [r for r in replies if not isinstance(r, BaseException)]
        if not answered:
            return JSONResponse({"error": f"no replica answered: {replies!r}", "error_type": "unhealthy"},
                                status_code=503)
        answered.sort(key=lambda r: (0 if r[0] < 300 else 2 if r[0] == 404 else 1))
        status, response_headers, content = answered[0]
        response = Response(content, status_code=status)
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response_headers]
        return response


# ---------------------------------------------------------------------------------------------------------------
# Building and running the application


def build_app(engine_config: "EngineConfig | None" = None, server_config: "ServerConfig | None" = None, *,
              num_replicas: int | None = None, autoscaling_config: dict | None = None,
              max_adapters_per_replica: int | None = None, replica_num_cpus: float | None = None,
              torch_threads: int | None = None, max_ongoing_requests: int | None = None,
              ingress_max_ongoing_requests: int = 1024) -> "Application":
    """The bound Ray Serve application: `LoraserveIngress` in front of `LoraserveReplica` x `num_replicas` (or
    Ray's autoscaler with `autoscaling_config`, passed through as Ray takes it, e.g. `{"min_replicas": 1,
    "max_replicas": 4, "target_ongoing_requests": 32}`).

    `max_ongoing_requests` per replica defaults to the engine's batch (`max_running_requests`): past that a
    replica's requests would only queue, so Ray's router may send an adapter's next request to another replica,
    which then loads it. `replica_num_cpus` is the Ray resource each replica asks for (default 1);
    `torch_threads` sets `torch.set_num_threads` in each replica.
    """
    from loraserve.config import EngineConfig, ServerConfig

    engine_config = engine_config or EngineConfig()
    server_config = server_config or ServerConfig()
    if autoscaling_config is not None and num_replicas is not None:
        raise ValueError("give num_replicas or autoscaling_config, not both")
    replica_options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests or engine_config.max_running_requests,
        "ray_actor_options": {"num_cpus": 1.0 if replica_num_cpus is None else replica_num_cpus},
        "health_check_period_s": 5.0,
        "request_router_config": RequestRouterConfig(request_router_class=AdapterAffinityRouter),
    }
    if autoscaling_config is not None:
        replica_options["autoscaling_config"] = dict(autoscaling_config)
    else:
        replica_options["num_replicas"] = num_replicas or 1
    replica = serve.deployment(LoraserveReplica, name="LoraserveReplica").options(**replica_options)
    ingress = serve.deployment(LoraserveIngress, name="LoraserveIngress").options(
        max_ongoing_requests=ingress_max_ongoing_requests, ray_actor_options={"num_cpus": 0})
    replicas = replica.bind(engine_config, server_config, max_adapters_per_replica, torch_threads)
    return ingress.bind(replicas, engine_config.adapter_source)


_RAY_ARGS = {  # app_builder's own arguments, beyond loraserve's flags
    "num_replicas": int,
    "autoscaling_config": json.loads,
    "max_adapters_per_replica": int,
    "replica_num_cpus": float,
    "torch_threads": int,
    "max_ongoing_requests": int,
}


def app_builder(args: dict[str, str]) -> "Application":
    """For `serve run loraserve.serving.ray_app:app_builder model_id=/path num_replicas=2 ...`: every loraserve flag
    by its flag name (its environment variable otherwise, as `loraserve serve`), plus the names of `_RAY_ARGS`."""
    from loraserve.config import FLAG_ENV, EngineConfig, ServerConfig, env_default

    args = dict(args or {})
    unknown = set(args) - set(FLAG_ENV) - set(_RAY_ARGS)
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}")

    def value(name: str) -> object | None:
        if name in args:
            kind = _RAY_ARGS.get(name) or FLAG_ENV[name][1]
            raw = args[name]
            return kind(raw) if isinstance(raw, str) else raw
        return env_default(name) if name in FLAG_ENV else None

    def fields_of(cls: type) -> dict[str, object]:
        picked = {f.name: value(f.name) for f in dataclasses.fields(cls) if f.name in FLAG_ENV}
        return {k: v for k, v in picked.items() if v is not None}

    engine_config, server_config = EngineConfig(**fields_of(EngineConfig)), ServerConfig(**fields_of(ServerConfig))
    ray_args = {name: value(name) for name in _RAY_ARGS}
    if ray_args["num_replicas"] is None and ray_args["autoscaling_config"] is None:
        # `loraserve serve --ray-replicas` / RAY_REPLICAS and --ray-autoscaling-config, where ServerConfig has them
        ray_args["autoscaling_config"] = getattr(server_config, "ray_autoscaling_config", None)
        if ray_args["autoscaling_config"] is None:
            ray_args["num_replicas"] = getattr(server_config, "ray_replicas", None) or None
    return build_app(engine_config, server_config, **{k: v for k, v in ray_args.items() if v is not None})


def __getattr__(name: str) -> object:
    """`loraserve.serving.ray_app:app` (what `serve run` imports): the application configured from the
    environment, built on first access so that importing this module stays free of side effects."""
    if name == "app":
        return app_builder({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cpu_share(engine_config: "EngineConfig", replicas: int) -> int | None:
    """The cores each CPU replica gets on a one-machine Ray: its share of them. Ray gives an actor one CPU and sets
    its OMP_NUM_THREADS to it, so without this a single replica on a many-core machine would decode on one thread.
    None (Ray's default) on a multi-node cluster or a GPU, where `app_builder`'s replica_num_cpus says it."""
    import ray

    if engine_config.torch_device().type != "cpu" or len(ray.nodes()) != 1:
        return None
    return max(1, int(ray.cluster_resources().get("CPU", 1)) // replicas)


def serve_with_ray(engine_config: "EngineConfig", server_config: "ServerConfig", replicas: int,
                   autoscaling: dict | None = None) -> None:
    """`loraserve serve --ray-replicas N`: join the Ray cluster at RAY_ADDRESS, else start a local one (`ray.init()`
    decides), serve the app on `server_config.hostname:port` through Ray Serve's proxy, block until SIGINT or
    SIGTERM, then shut Serve down."""
    import ray

    ray.init()
    stopping = threading.Event()

    def stop(*_: object) -> None:
        stopping.set()

    # right after ray.init (whose own SIGTERM handler would end the process without shutting Serve down), before the
    # deployment starts: a signal while it starts stops it once it has started
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options={"host": server_config.hostname, "port": server_config.port})
        share = None if autoscaling else _cpu_share(engine_config, replicas)
        application = build_app(engine_config, server_config, num_replicas=None if autoscaling else replicas,
                                autoscaling_config=autoscaling, replica_num_cpus=share, torch_threads=share)
        serve.run(application, name=APP_NAME, route_prefix="/")
        logger.info("serving on http://%s:%d with %s engine replicas", server_config.hostname, server_config.port,
                    "autoscaled" if autoscaling else replicas)
        while not stopping.wait(0.5):
            pass
        logger.info("stopping: shutting Ray Serve down")
    finally:
        serve.shutdown()
        ray.shutdown()
