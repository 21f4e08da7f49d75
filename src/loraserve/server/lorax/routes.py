"""LoRAX's native routes: `/generate`, `/generate_stream`, `/` (the clients' compat route), `/tokenize`, `/health`,
`/info`, `/metrics`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask

from loraserve.engine.api import AdapterRef, AsyncEngine, Completion, RequestOutput, TokenInfo, collect
from loraserve.errors import LoraserveError
from loraserve.server.auth import check_adapter, hub_token
from loraserve.server.convert import adapter_from_lorax, sampling_params_from_lorax
from loraserve.server.disconnect import unless_disconnected
from loraserve.server.errors import error_body, status_for
from loraserve.server.lorax.schemas import (
    AlternativeToken,
    CompatGenerateRequest,
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
    TokenizeRequest,
    TokenSpan,
)
from loraserve.server.sse import sse_event

router = APIRouter()
_ERRORS = {422: {"model": ErrorResponse}, 424: {"model": ErrorResponse}, 429: {"model": ErrorResponse}}


def _engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


def _label(adapter: AdapterRef | None) -> str:
    return adapter.adapter_id if adapter is not None else ""


def _adapter(body: GenerateRequest, request: Request) -> AdapterRef | None:
    token = hub_token(request, body.parameters.api_token)
    ref = adapter_from_lorax(body.parameters, token, _engine(request).info().adapter_source)
    return check_adapter(request, ref)


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True, responses=_ERRORS)
async def generate(body: GenerateRequest, request: Request, response: Response) -> GenerateResponse:
    started = time.monotonic()
    params = sampling_params_from_lorax(body.parameters, reports_tokens=bool(body.parameters.details))
    adapter = _adapter(body, request)
    await _engine(request).compile_grammar(params.grammar)
    release = request.app.state.admission.acquire()
    try:
        outputs = await _engine(request).submit(body.inputs, params, adapter=adapter)
        validated = time.monotonic()
        completion = await unless_disconnected(
            request, collect(request.app.state.metrics.observed(outputs, _label(adapter))))
    finally:
        release()
    text = body.inputs + completion.text if body.parameters.return_full_text else completion.text
    details = None
    if body.parameters.details:
        prefill = _prefill(body.inputs, completion, request) if body.parameters.decoder_input_details else []
        details = _details(completion, params.seed, prefill)
    response.headers.update(_timing_headers(body, request, adapter, completion, validated - started,
                                            time.monotonic() - started))
    return GenerateResponse(generated_text=text, details=details)


def _common_headers(body: GenerateRequest, request: Request, adapter: AdapterRef | None) -> dict[str, str]:
    info = _engine(request).info()
    headers = {"x-compute-type": info.device_type, "x-compute-characters": str(len(body.inputs)),
               "x-model-id": info.model_name}
    if adapter is not None:
        headers |= {"x-adapter-id": adapter.adapter_id, "x-adapter-source": adapter.source}
    return headers


def _timing_headers(body: GenerateRequest, request: Request, adapter: AdapterRef | None, completion: Completion,
                    validation: float, total: float) -> dict[str, str]:
    """LoRAX's `x-*` headers of `/generate`; times in milliseconds."""
    timings = completion.timings
    generated = len(completion.tokens)
    inference = timings.inference if timings else 0.0
    first_token = timings.time_to_first_token if timings else None
    per_token = inference / generated if generated else 0.0
    values = {
        "x-total-time": total * 1e3, "x-validation-time": validation * 1e3,
        "x-queue-time": (timings.queue if timings else 0.0) * 1e3, "x-inference-time": inference * 1e3,
        "x-compute-time": inference * 1e3, "x-time-per-token": per_token * 1e3,
        "x-time-to-first-token": (first_token or 0.0) * 1e3,
        "x-time-per-output-token": per_token * 1e3,
    }
    headers = {name: f"{value:.3f}" for name, value in values.items()}
    headers |= {"x-prompt-tokens": str(completion.prompt_tokens), "x-generated-tokens": str(generated),
                "x-total-tokens": str(completion.prompt_tokens + generated), "x-skipped-tokens": "0"}
    return _common_headers(body, request, adapter) | headers


def _prefill(inputs: str, completion: Completion, request: Request) -> list[PrefillToken]:
    """`decoder_input_details`: each prompt token with its logprob given its prefix (the first has none)."""
    tokenizer = _engine(request).tokenizer
    first = tokenizer.encode(inputs)[0]
    entries = [(first, None)] + [(token, logprob) for token, logprob, _ in completion.prompt_logprobs or []]
    return [PrefillToken(id=token, text=tokenizer.decode([token]), logprob=logprob) for token, logprob in entries]


@router.post("/tokenize", responses=_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> list[TokenSpan]:
    """Token ids with their text and character offsets in `inputs` (LoRAX's `/tokenize`)."""
    tokenizer = _engine(request).tokenizer
    encoded = tokenizer(body.inputs, add_special_tokens=body.add_special_tokens is not False,
                        return_offsets_mapping=True)
    return [TokenSpan(id=token, text=body.inputs[start:stop], start=start, stop=stop)
            for token, (start, stop) in zip(encoded["input_ids"], encoded["offset_mapping"])]


@router.post("/generate_stream", response_class=StreamingResponse, responses=_ERRORS)
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    """One SSE event per token; the last also carries `generated_text` and `details`. No `[DONE]` (as LoRAX)."""
    params = sampling_params_from_lorax(body.parameters, reports_tokens=True)
    adapter = _adapter(body, request)
    await _engine(request).compile_grammar(params.grammar)
    release = request.app.state.admission.acquire()
    try:
        outputs = request.app.state.metrics.observed(
            await _engine(request).submit(body.inputs, params, adapter=adapter), _label(adapter)
        )
    except Exception:
        release()
        raise
    prefix = body.inputs if body.parameters.return_full_text else ""
    return StreamingResponse(
        _stream_events(outputs, prefix, params.seed, release), media_type="text/event-stream",
        background=BackgroundTask(release),  # also covers a client gone before the stream started
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} | _common_headers(body, request, adapter),
    )


@router.post("/", responses=_ERRORS)
async def compat_generate(body: CompatGenerateRequest, request: Request) -> Response:
    """What lorax-client posts to: a stream, or a one-element list holding the `/generate` reply (details always)."""
    if body.stream:
        return await generate_stream(body, request)
    body.parameters.details = True
    headers = Response()
    reply = await generate(body, request, headers)
    timing = {name: value for name, value in headers.headers.items() if name.startswith("x-")}
    return JSONResponse([reply.model_dump(exclude_none=True)], headers=timing)


async def _stream_events(
    outputs: AsyncIterator[RequestOutput], prefix: str, seed: int | None, release: Callable[[], None]
) -> AsyncIterator[str]:
    try:
        async for output in outputs:
            for index, token in enumerate(output.tokens):
                last = output.finished and index == len(output.tokens) - 1
                event = StreamResponse(token=_token(token))
                if last:
                    event.generated_text = prefix + (output.generated_text or "")
                    event.details = StreamDetails(
                        finish_reason=output.finish_reason.value if output.finish_reason else "length",
                        prompt_tokens=output.prompt_tokens,
                        generated_tokens=output.generated_tokens,
                        seed=seed,
                    )
                yield sse_event(event)
    except LoraserveError as error:
        # the status line is already sent: report the failure in-band, as LoRAX does
        yield sse_event(error_body(str(error), status_for(error, "/generate_stream")[1]))
    finally:
        release()


def _token(token: TokenInfo) -> Token:
    alternatives = (
        [AlternativeToken(id=i, text=s, logprob=lp) for i, s, lp in token.top_logprobs] if token.top_logprobs else None
    )
    return Token(id=token.id, text=token.text, logprob=token.logprob, special=token.special,
                 alternative_tokens=alternatives)


def _details(completion: Completion, seed: int | None, prefill: list[PrefillToken]) -> Details:
    return Details(
        finish_reason=completion.finish_reason.value if completion.finish_reason else "length",
        prompt_tokens=completion.prompt_tokens,
        generated_tokens=len(completion.tokens),
        seed=seed,
        prefill=prefill,
        tokens=[_token(t) for t in completion.tokens],
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    resident = await _engine(request).resident_adapters()
    return Response(request.app.state.metrics.exposition(resident), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(request: Request) -> Response:
    if _engine(request).is_running:
        return Response(status_code=200)
    return JSONResponse(error_body("unhealthy", "healthcheck"), status_code=503)


@router.get("/info")
async def info(request: Request) -> dict:
    info = _engine(request).info()
    return {
        "model_id": info.model_name,
        "model_dtype": info.dtype,
        "model_device_type": info.device_type,
        "max_input_length": info.max_input_length,
        "max_total_tokens": info.max_total_tokens,
        "max_batch_total_tokens": info.kv_capacity_tokens,
        "max_concurrent_requests": request.app.state.server_config.max_concurrent_requests,
        "version": request.app.version,
    }
