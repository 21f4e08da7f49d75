"""Request parameters and typed responses of the LoRAX REST API, named as in lorax-client so code ports unchanged.

Response models ignore fields they do not know, so a newer server does not break an older client.
"""

from __future__ import annotations

from typing import Any, TypedDict

from pydantic import BaseModel


class GenerateParameters(TypedDict, total=False):
    """Keyword arguments of `generate` / `generate_stream`. None (or absent) means "server default": it is not sent.

    `stop_sequences` is lorax-client's name for `stop`; give one or the other. Unlisted keywords are sent as they are.
    """

    adapter_id: str | None
    adapter_source: str | None
    merged_adapters: dict[str, Any] | None
    api_token: str | None
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    typical_p: float | None
    do_sample: bool | None
    seed: int | None
    stop: list[str] | None
    stop_sequences: list[str] | None
    repetition_penalty: float | None
    frequency_penalty: float | None
    presence_penalty: float | None
    ignore_eos_token: bool | None
    return_full_text: bool | None
    truncate: int | None
    best_of: int | None
    watermark: bool | None
    details: bool | None
    decoder_input_details: bool | None
    return_k_alternatives: int | None
    response_format: dict[str, Any] | None


class ChatParameters(TypedDict, total=False):
    """Keyword arguments of `chat`: OpenAI's fields plus loraserve's extensions. `model` names the adapter ("" or
    None = base model)."""

    model: str | None
    max_tokens: int | None
    max_completion_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    n: int | None
    stop: str | list[str] | None
    seed: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    repetition_penalty: float | None
    logprobs: bool | None
    top_logprobs: int | None
    stream_options: dict[str, Any] | None
    response_format: dict[str, Any] | None
    ignore_eos: bool | None
    adapter_source: str | None
    api_token: str | None


class InputToken(BaseModel):
    """A prompt token; the first one has no logprob."""

    id: int
    text: str
    logprob: float | None = None


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class Token(BaseModel):
    """A generated token. `special` tokens (EOS) are usually left out when concatenating text."""

    id: int
    text: str
    logprob: float | None = None
    special: bool = False
    alternative_tokens: list[AlternativeToken] | None = None
    skipped: bool = False


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    prefill: list[InputToken] = []
    tokens: list[Token] = []


class Details(BaseModel):
    """`finish_reason` is "length", "eos_token" or "stop_sequence"."""

    finish_reason: str
    prompt_tokens: int | None = None
    generated_tokens: int
    skipped_tokens: int = 0
    seed: int | None = None
    prefill: list[InputToken] = []
    tokens: list[Token] = []
    best_of_sequences: list[BestOfSequence] | None = None


class Response(BaseModel):
    """What `generate` returns; `details` is None unless details were requested (the default here)."""

    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: str
    prompt_tokens: int | None = None
    generated_tokens: int
    seed: int | None = None


class StreamResponse(BaseModel):
    """One event of `generate_stream`; only the last carries `generated_text` (and `details` if requested)."""

    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None
