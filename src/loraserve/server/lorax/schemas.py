"""LoRAX's request and response bodies, field for field (every optional field also accepts an explicit null)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from loraserve.server.response_format import ResponseFormat
from loraserve.server.text import RequestBody


class MergedAdapters(BaseModel):
    """LoRAX's per-request merge. `density` defaults to 1.0 (keep everything), not LoRAX's 0.0, which would prune a
    TIES or DARE merge to nothing without a word."""

    ids: list[str]
    weights: list[float]
    merge_strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"


class GenerateParameters(BaseModel):
    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: MergedAdapters | None = None
    api_token: str | None = None
    best_of: int | None = None
    decoder_input_details: bool | None = False
    details: bool | None = False
    do_sample: bool | None = False
    frequency_penalty: float | None = None
    ignore_eos_token: bool | None = False
    max_new_tokens: int | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = False
    return_k_alternatives: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool | None = False
    response_format: ResponseFormat | None = None
    # ours: seconds until the request is aborted with 504 (at most --max-request-seconds, which is also the default)
    request_timeout: float | None = Field(None, gt=0)


class GenerateRequest(RequestBody):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    """The body of `POST /`, which lorax-client and TGI's client use for both plain and streamed generation."""

    stream: bool = False


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool
    alternative_tokens: list[AlternativeToken] | None = None


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None  # none for the first token (left out of replies, as every null is)


class BestOfSequence(BaseModel):
    """One of the `best_of` sequences that was not returned (LoRAX's and TGI's shape)."""

    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]


class Details(BaseModel):
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    seed: int | None = None


class StreamResponse(BaseModel):
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class TokenizeRequest(RequestBody):
    inputs: str
    add_special_tokens: bool | None = True


class TokenSpan(BaseModel):
    id: int
    text: str
    start: int  # character offsets of the token in `inputs`
    stop: int


class Info(BaseModel):
    model_id: str
    model_dtype: str
    model_device_type: str
    max_input_length: int
    max_total_tokens: int
    max_batch_total_tokens: int
    max_concurrent_requests: int
    version: str
