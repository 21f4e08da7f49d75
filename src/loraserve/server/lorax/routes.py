"""LoRAX's native routes: `/generate`, `/generate_stream`, `/` (the clients' compat route), `/tokenize`, `/health`,
`/info`, `/metrics`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from transformers import PreTrainedTokenizerBase

from loraserve.config import ServerConfig
from loraserve.engine.api import AdapterRef, AsyncEngine, Completion, RequestOutput, TokenInfo
from loraserve.errors import LoraserveError
from loraserve.server.auth import check_adapter, hub_token
from loraserve.server.choices import best_first, collect_all
from loraserve.server.convert import adapter_from_lorax, lorax_prompt, sampling_params_from_lorax
from loraserve.server.disconnect import unless_disconnected
from loraserve.server.errors import ErrorResponse, error_body, error_response, error_responses, status_for
from loraserve.server.limits import check_best_of, check_truncate
from loraserve.server.lorax.schemas import (
    AlternativeToken,
    BestOfSequence,
    CompatGenerateRequest,
    Details,
    GenerateRequest,
    GenerateResponse,
    Info,
    PrefillToken,
    StreamDetails,
    StreamResponse,
    Token,
    TokenizeRequest,
    TokenSpan,
)
from loraserve.server.openapi import sse_content
from loraserve.server.sse import sse_event
from loraserve.server.text import header_value

router = APIRouter()
_EVENTS = sse_content(StreamResponse, ErrorResponse)  # a failure after the status line is an error event


def _engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


def _config(request: Request) -> ServerConfig:
    return request.app.state.server_config


def _label(adapter: AdapterRef | None) -> str:
    return adapter.adapter_id if adapter is not None else ""


def _adapter(body: GenerateRequest, request: Request) -> AdapterRef | None:
    token = hub_token(request, body.parameters.api_token)
    ref = adapter_from_lorax(body.parameters, token, _engine(request).info().adapter_source, _config(request))
    return check_adapter(request, ref)


async def _prompt(body: GenerateRequest, request: Request) -> list[int]:
    """The prompt's tokens, counted (and truncated, for `truncate`) in a worker thread."""
    engine = _engine(request)
    check_truncate(body.parameters.truncate, engine.info().max_input_length)
    return await asyncio.to_thread(lorax_prompt, engine.tokenizer, body.inputs, body.parameters.truncate)


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             responses=error_responses(401, 413, 422, 424, 429, 499, 503, 504))
async def generate(body: GenerateRequest, request: Request, response: Response) -> GenerateResponse:
    """With `best_of` > 1 (sampling only, no seed, at most --max-best-of), that many sequences are sampled and the
    one with the highest mean token logprob is returned; with `details`, the others are in `best_of_sequences`."""
    started = time.monotonic()
    engine, config, parameters = _engine(request), _config(request), body.parameters
    ranked = (parameters.best_of or 1) > 1
    params = sampling_params_from_lorax(parameters, reports_tokens=bool(parameters.details) or ranked, config=config)
    best_of = check_best_of(parameters.best_of, sampled=not params.greedy, seeded=params.seed is not None,
                            streamed=False, config=config)
    adapter = _adapter(body, request)
    prompt = await _prompt(body, request)
    await engine.compile_grammar(params.grammar)
    release = request.app.state.admission.acquire()
    try:
        streams = [request.app.state.metrics.observed(
            await engine.submit(prompt, params, adapter=adapter, timeout=parameters.request_timeout),
            _label(adapter)) for _ in range(best_of)]
        validated = time.monotonic()
        best, *others = best_first(await unless_disconnected(request, collect_all(streams)))
    finally:
        release()
    prefix = body.inputs if parameters.return_full_text else ""
    details = None
    if parameters.details:
        prefill = _prefill(prompt, best, engine.tokenizer) if parameters.decoder_input_details else []
        details = _details(best, params.seed, prefill)
        if others:
            details.best_of_sequences = [_best_of_sequence(other, prefix, prefill) for other in others]
    response.headers.update(_timing_headers(body, request, adapter, best, validated - started,
                                            time.monotonic() - started))
    return GenerateResponse(generated_text=prefix + best.text, details=details)


def _common_headers(body: GenerateRequest, request: Request, adapter: AdapterRef | None) -> dict[str, str]:
    info = _engine(request).info()
    headers = {"x-compute-type": info.device_type, "x-compute-characters": str(len(body.inputs)),
               "x-model-id": header_value(info.model_name)}
    if adapter is not None:
        headers |= {"x-adapter-id": header_value(adapter.adapter_id), "x-adapter-source": header_value(adapter.source)}
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


def _prefill(prompt: list[int], completion: Completion, tokenizer: PreTrainedTokenizerBase) -> list[PrefillToken]:
    """`decoder_input_details`: each prompt token with its logprob given its prefix (the first has none)."""
    entries = [(prompt[0], None)] + [(token, logprob) for token, logprob, _ in completion.prompt_logprobs or []]
    return [PrefillToken(id=token, text=tokenizer.decode([token]), logprob=logprob) for token, logprob in entries]


@router.post("/tokenize", responses=error_responses(401, 413, 422, 503))
async def tokenize(body: TokenizeRequest, request: Request) -> list[TokenSpan]:
    """Token ids with their text and character offsets in `inputs` (LoRAX's `/tokenize`)."""
    tokenizer = _engine(request).tokenizer
    encoded = await asyncio.to_thread(tokenizer, body.inputs, add_special_tokens=body.add_special_tokens is not False,
                                      return_offsets_mapping=True)
    return [TokenSpan(id=token, text=body.inputs[start:stop], start=start, stop=stop)
            for token, (start, stop) in zip(encoded["input_ids"], encoded["offset_mapping"])]


@router.post("/generate_stream", response_class=StreamingResponse,
             responses={200: {"description": "The token stream", "content": _EVENTS}}
             | error_responses(401, 413, 422, 424, 429, 503))
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    """One SSE event per token; the last also carries `generated_text` and `details`. No `[DONE]` (as LoRAX)."""
    config, parameters = _config(request), body.parameters
    params = sampling_params_from_lorax(parameters, reports_tokens=True, config=config)
    check_best_of(parameters.best_of, sampled=not params.greedy, seeded=params.seed is not None, streamed=True,
                  config=config)
    adapter = _adapter(body, request)
    prompt = await _prompt(body, request)
    await _engine(request).compile_grammar(params.grammar)
    release = request.app.state.admission.acquire()
    try:
        outputs = request.app.state.metrics.observed(
            await _engine(request).submit(prompt, params, adapter=adapter, timeout=parameters.request_timeout),
            _label(adapter)
        )
    except Exception:
        release()
        raise
    prefix = body.inputs if parameters.return_full_text else ""
    return StreamingResponse(
        _stream_events(outputs, prefix, params.seed, release), media_type="text/event-stream",
        background=BackgroundTask(release),  # also covers a client gone before the stream started
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} | _common_headers(body, request, adapter),
    )


@router.post("/", response_model=None,
             responses={200: {"description": "`[GenerateResponse]`, or the token stream when `stream` is true",
                              "model": list[GenerateResponse], "content": _EVENTS}}
             | error_responses(401, 413, 422, 424, 429, 499, 503, 504))
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


def _finish_reason(completion: Completion) -> str:
    return completion.finish_reason.value if completion.finish_reason else "length"


def _details(completion: Completion, seed: int | None, prefill: list[PrefillToken]) -> Details:
    return Details(finish_reason=_finish_reason(completion), prompt_tokens=completion.prompt_tokens,
                   generated_tokens=len(completion.tokens), seed=seed, prefill=prefill,
                   tokens=[_token(t) for t in completion.tokens])


def _best_of_sequence(completion: Completion, prefix: str, prefill: list[PrefillToken]) -> BestOfSequence:
    return BestOfSequence(generated_text=prefix + completion.text, finish_reason=_finish_reason(completion),
                          generated_tokens=len(completion.tokens), seed=None, prefill=prefill,
                          tokens=[_token(t) for t in completion.tokens])


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition",
                             "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}}
            | error_responses(401, 503))
async def metrics(request: Request) -> Response:
    resident = await _engine(request).resident_adapters()
    return Response(request.app.state.metrics.exposition(resident), media_type=CONTENT_TYPE_LATEST)


@router.get("/health", response_class=Response,
            responses={200: {"description": "Ready: the model is loaded and the step loop runs (no body)"}}
            | error_responses(503))
async def health(request: Request) -> Response:
    if _engine(request).is_running:
        return Response(status_code=200)
    return error_response(request.url.path, "unhealthy", "healthcheck", 503)


@router.get("/info", responses=error_responses(401, 503))
async def info(request: Request) -> Info:
    info = _engine(request).info()
    return Info(model_id=info.model_name, model_dtype=info.dtype, model_device_type=info.device_type,
                max_input_length=info.max_input_length, max_total_tokens=info.max_total_tokens,
                max_batch_total_tokens=info.kv_capacity_tokens,
                max_concurrent_requests=_config(request).max_concurrent_requests, version=request.app.version)
