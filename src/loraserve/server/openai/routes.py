"""`/v1/completions`, `/v1/chat/completions`, `/v1/models`. `model` names the adapter ("" or the base id = none).

Where LoRAX's OpenAI layer is loose, these follow OpenAI: a stop sequence ends with finish_reason "stop" and is not
part of the text, ids are unique, the requested `model` is echoed, streams end with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.background import BackgroundTask

from loraserve import __version__
from loraserve.config import ServerConfig
from loraserve.engine.api import AdapterRef, AsyncEngine, FinishReason, RequestOutput, TokenInfo
from loraserve.engine.api import Completion as EngineCompletion
from loraserve.errors import InvalidRequest, LoraserveError
from loraserve.sampling.params import SamplingParams
from loraserve.server.auth import check_adapter, hub_token, visible
from loraserve.server.choices import choice_params, collect_all
from loraserve.server.disconnect import unless_disconnected
from loraserve.server.errors import OpenAIErrorResponse, error_responses, openai_error_body, status_for
from loraserve.server.limits import check_n, check_stop_sequences
from loraserve.server.openapi import sse_content
from loraserve.server.response_format import grammar_for
from loraserve.server.openai.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    Model,
    ModelList,
    SamplingFields,
    TokenLogprob,
    Usage,
)
from loraserve.server.sse import sse_event

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")
FINGERPRINT = f"loraserve-{__version__}"


def _engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


_GENERATION_ERRORS = error_responses(401, 404, 413, 422, 424, 429, 499, 503, 504, openai=True)


def _streamed(model: type[BaseModel], chunk: type[BaseModel], description: str) -> dict:
    """A 200 that is `model` as JSON, or `chunk` events ending with `[DONE]` when `stream` is true (and an error
    event where the generation fails after the status line)."""
    return {200: {"model": model, "description": f"{description}, or its chunks as server-sent events when "
                                                 "`stream` is true",
                  "content": sse_content(chunk, OpenAIErrorResponse, done_marker=True)}}


@router.get("/models", responses=error_responses(401, 503, openai=True))
async def models(request: Request) -> ModelList:
    """The base model, then every known adapter as vLLM lists them: each registered name (and each unnamed adapter
    by its id) with `parent` the base model and `root` where its files are."""
    engine = _engine(request)
    base = engine.info().model_name
    created = int(time.time())
    entries = [Model(id=base, created=created, owned_by="loraserve", root=base, parent=None)]
    for info in await engine.list_adapters():
        if not visible(request, info):
            continue
        for model_id in info.names or (info.adapter_id,):
            entries.append(Model(id=model_id, created=created, owned_by="loraserve", root=info.adapter_id,
                                 parent=base, source=info.source, tier=info.tier))
    return ModelList(data=entries)


@router.post("/completions", response_model=None,
             responses=_streamed(Completion, Completion, "The completion") | _GENERATION_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
    params = _params(body, 16 if body.max_tokens is None else body.max_tokens, body.logprobs, _config(request))
    return await _serve(request, body, body.prompt, params, streaming_completion, completion_reply)


@router.post("/chat/completions", response_model=None,
             responses=_streamed(ChatCompletion, ChatCompletionChunk, "The chat completion") | _GENERATION_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> ChatCompletion | StreamingResponse:
    engine = _engine(request)
    tokenizer = engine.tokenizer
    messages = [message.model_dump(exclude_none=True) for message in body.messages]
    adapter = _adapter(body, request)
    # an adapter trained on its own chat format ships its template; the base tokenizer's is the default
    template = await engine.adapter_chat_template(adapter) if adapter is not None else None

    def render() -> list[int]:
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - jinja and template errors of every kind are the caller's input
            raise InvalidRequest(f"cannot apply the chat template: {error}") from error
        return tokenizer.encode(text, add_special_tokens=False)  # the template already holds BOS

    prompt = await asyncio.to_thread(render)  # off the event loop: templates and long prompts take time
    top = body.top_logprobs if body.logprobs else None
    max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    params = _params(body, max_tokens, top, _config(request))
    return await _serve(request, body, prompt, params, streaming_chat, chat_reply)


def _config(request: Request) -> ServerConfig:
    return request.app.state.server_config


def _params(body: SamplingFields, max_tokens: int | None, logprobs: int | None,
            config: ServerConfig) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    check_stop_sequences(stop, config)
    check_n(body.n, config)
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        min_p=body.min_p, repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty, seed=body.seed, stop=stop, include_stop_in_output=False,
        ignore_eos=body.ignore_eos, chosen_logprob=logprobs is not None, logprobs=logprobs or None,
        grammar=grammar_for(body.response_format, config),
    )


def _adapter(body: SamplingFields, request: Request) -> AdapterRef | None:
    engine = _engine(request)
    info = engine.info()
    if body.model in ("", info.model_name):
        return None
    token = hub_token(request, body.api_token)
    return check_adapter(request, AdapterRef(body.model, body.adapter_source or info.adapter_source, token))


async def _serve(request: Request, body: SamplingFields, prompt: str | list[int], params: SamplingParams,
                 streamer: Callable, replier: Callable):
    """Start the `n` generations (validation errors raise here, as HTTP errors), then reply or stream."""
    engine = _engine(request)
    adapter = _adapter(body, request)
    await engine.compile_grammar(params.grammar)
    release = request.app.state.admission.acquire()
    try:
        label = adapter.adapter_id if adapter is not None else ""
        streams = [request.app.state.metrics.observed(await engine.submit(prompt, choice_params(params, i),
                                                                      adapter=adapter, timeout=body.request_timeout),
                                                      label)
                   for i in range(body.n)]
    except Exception:
        release()
        raise
    meta = (body.model or engine.info().model_name, int(time.time()))
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = streamer(engine, streams, meta, include_usage, release)
        return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(release),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        results = await unless_disconnected(request, collect_all(streams))
    finally:
        release()
    return replier(engine, results, meta)


def _finish(reason: FinishReason | None) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def _usage(results: list[EngineCompletion]) -> Usage:
    prompt = results[0].prompt_tokens
    completion = sum(len(r.tokens) for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _chat_logprobs(engine: AsyncEngine, tokens: list[TokenInfo]) -> ChoiceLogprobs | None:
    if not tokens or tokens[0].logprob is None:
        return None
    decode = engine.tokenizer.decode
    return ChoiceLogprobs(content=[
        TokenLogprob(token=decode([t.id]), logprob=t.logprob,
                     top_logprobs=[{"token": s, "logprob": lp, "bytes": list(s.encode())}
                                   for _, s, lp in t.top_logprobs or []])
        for t in tokens
    ])


def completion_reply(engine: AsyncEngine, results: list[EngineCompletion], meta: tuple[str, int]) -> Completion:
    choices = []
    for index, result in enumerate(results):
        logprobs = None
        if result.tokens and result.tokens[0].logprob is not None:
            decode = engine.tokenizer.decode
            logprobs = CompletionLogprobs(
                tokens=[decode([t.id]) for t in result.tokens],
                token_logprobs=[t.logprob for t in result.tokens],
                top_logprobs=[{s: lp for _, s, lp in t.top_logprobs or []} for t in result.tokens],
            )
        choices.append(CompletionChoice(index=index, text=result.text, logprobs=logprobs,
                                        finish_reason=_finish(result.finish_reason)))
    return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=meta[1], model=meta[0],
                      system_fingerprint=FINGERPRINT, choices=choices, usage=_usage(results))


def chat_reply(engine: AsyncEngine, results: list[EngineCompletion], meta: tuple[str, int]) -> ChatCompletion:
    choices = [
        ChatChoice(index=i, message=AssistantMessage(content=r.text), logprobs=_chat_logprobs(engine, r.tokens),
                   finish_reason=_finish(r.finish_reason))
        for i, r in enumerate(results)
    ]
    return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=meta[1], model=meta[0],
                          system_fingerprint=FINGERPRINT, choices=choices, usage=_usage(results))


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the choices' outputs as they come; closing this closes (and so aborts) every stream."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as error:  # noqa: BLE001 - forwarded to the response
            await queue.put((index, error))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


async def _events(engine: AsyncEngine, streams: list, meta: tuple[str, int], include_usage: bool,
                  release: Callable[[], None], chunk: Callable) -> AsyncIterator[str]:
    counts = {"prompt": 0, "completion": 0}
    try:
        for index in range(len(streams)):
            first = chunk(index, None, None, True)
            if first is not None:
                yield sse_event(first)
        async for index, output in _merged(streams):
            counts["prompt"] = output.prompt_tokens
            counts["completion"] += len(output.tokens)
            reason = _finish(output.finish_reason) if output.finished else None
            yield sse_event(chunk(index, output, reason, False))
        if include_usage:
            usage = Usage(prompt_tokens=counts["prompt"], completion_tokens=counts["completion"],
                          total_tokens=counts["prompt"] + counts["completion"])
            yield sse_event(chunk(None, None, None, False, usage))
    except Exception as error:  # noqa: BLE001 - the status is sent: report in-band, as OpenAI's SDK expects
        status, kind = status_for(error, "/v1/")
        if not isinstance(error, LoraserveError):  # a bug's text may name server internals: it goes to the log
            logger.error("a streamed completion failed", exc_info=error)
        message = str(error) if isinstance(error, LoraserveError) else "the generation failed"
        yield sse_event(openai_error_body(message, kind, status))
    finally:
        release()
    yield "data: [DONE]\n\n"


def streaming_completion(engine: AsyncEngine, streams: list, meta: tuple[str, int], include_usage: bool,
                         release: Callable[[], None]) -> AsyncIterator[str]:
    completion_id = f"cmpl-{uuid.uuid4().hex}"

    def chunk(index, output, reason, opening, usage=None):  # noqa: ANN001, ANN202 - local adapter
        if opening:
            return None  # completions streams have no role chunk
        choices = [] if output is None else [CompletionChoice(index=index, text=output.text, finish_reason=reason)]
        return Completion(id=completion_id, created=meta[1], model=meta[0], system_fingerprint=FINGERPRINT,
                          choices=choices, usage=usage)

    return _events(engine, streams, meta, include_usage, release, chunk)


def streaming_chat(engine: AsyncEngine, streams: list, meta: tuple[str, int], include_usage: bool,
                   release: Callable[[], None]) -> AsyncIterator[str]:
    chat_id = f"chatcmpl-{uuid.uuid4().hex}"

    def chunk(index, output, reason, opening, usage=None):  # noqa: ANN001, ANN202 - local adapter
        if output is None and not opening:
            choices = []
        elif opening:
            choices = [ChatChunkChoice(index=index, delta=Delta(role="assistant", content=""))]
        else:
            choices = [ChatChunkChoice(index=index, delta=Delta(role="assistant", content=output.text),
                                       logprobs=_chat_logprobs(engine, output.tokens), finish_reason=reason)]
        return ChatCompletionChunk(id=chat_id, created=meta[1], model=meta[0], system_fingerprint=FINGERPRINT,
                                   choices=choices, usage=usage)

    return _events(engine, streams, meta, include_usage, release, chunk)

