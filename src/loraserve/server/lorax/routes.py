"""LoRAX's native routes: `/generate` (and `/health`, `/info`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from loraserve.engine.async_engine import AsyncEngine
from loraserve.engine.llm import Completion, collect
from loraserve.server.convert import sampling_params_from_lorax
from loraserve.server.errors import error_body
from loraserve.server.lorax.schemas import (
    AlternativeToken,
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Token,
)

router = APIRouter()


def _engine(request: Request) -> AsyncEngine:
    return request.app.state.engine


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True,
             responses={422: {"model": ErrorResponse}, 424: {"model": ErrorResponse}})
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    params = sampling_params_from_lorax(body.parameters)
    completion = await collect(_engine(request).generate(body.inputs, params))
    text = body.inputs + completion.text if body.parameters.return_full_text else completion.text
    details = _details(completion, params.seed) if body.parameters.details else None
    return GenerateResponse(generated_text=text, details=details)


def _details(completion: Completion, seed: int | None) -> Details:
    tokens = [
        Token(
            id=t.id,
            text=t.text,
            logprob=t.logprob,
            special=t.special,
            alternative_tokens=[AlternativeToken(id=i, text=s, logprob=lp) for i, s, lp in t.top_logprobs]
            if t.top_logprobs
            else None,
        )
        for t in completion.tokens
    ]
    return Details(
        finish_reason=completion.finish_reason.value if completion.finish_reason else "length",
        prompt_tokens=completion.prompt_tokens,
        generated_tokens=len(completion.tokens),
        seed=seed,
        prefill=[],
        tokens=tokens,
    )


@router.get("/health")
async def health(request: Request) -> Response:
    if _engine(request).is_running:
        return Response(status_code=200)
    return JSONResponse(error_body("unhealthy", "healthcheck"), status_code=503)


@router.get("/info")
async def info(request: Request) -> dict:
    engine = _engine(request).engine
    config = engine.config
    return {
        "model_id": engine.model_name,
        "model_dtype": str(config.torch_dtype()),
        "model_device_type": config.torch_device().type,
        "max_input_length": engine.max_input_length,
        "max_total_tokens": engine.max_total_tokens,
        "max_batch_total_tokens": engine.block_manager.num_blocks * engine.block_manager.block_size,
        "max_concurrent_requests": request.app.state.server_config.max_concurrent_requests,
        "version": request.app.version,
    }
