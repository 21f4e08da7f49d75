"""Sampling parameters with LoRAX/TGI and OpenAI semantics, and their validation.

Greedy or sampled follows LoRAX's Python server: sampling is on when `do_sample` is set or any warper differs from
its neutral value (temperature not 1, top_k > 0, top_p < 1, typical_p < 1, min_p > 0); temperature 0 always means
greedy, as in OpenAI's API. Penalties apply in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraserve.errors import InvalidRequest


@dataclass
class SamplingParams:
    max_new_tokens: int | None = None  # None: up to the request's token limit (LoRAX's default)
    temperature: float | None = None  # None = 1.0
    top_k: int | None = None  # None or 0 = disabled
    top_p: float | None = None  # None = 1.0
    typical_p: float | None = None  # None = 1.0
    min_p: float | None = None  # None = 0.0
    repetition_penalty: float | None = None  # HF semantics over prompt and output tokens; None = 1.0
    frequency_penalty: float | None = None  # OpenAI semantics over output tokens; None = 0.0
    presence_penalty: float | None = None  # OpenAI semantics over output tokens; None = 0.0
    do_sample: bool = False
    seed: int | None = None  # per request: same seed, same output, whatever else is in the batch
    stop: list[str] = field(default_factory=list)  # stop sequences, matched on decoded text
    include_stop_in_output: bool = True  # LoRAX keeps the stop text in generated_text; OpenAI drops it
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    chosen_logprob: bool = True  # report the chosen token's logprob (costs a pass over the vocabulary per token)
    logprobs: int | None = None  # top-n alternatives per token (implies chosen_logprob)
    prompt_logprobs: int | None = None  # None: none; n >= 0: each prompt token's logprob plus top-n alternatives
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        if self.temperature == 0:
            return True
        warped = (
            (self.temperature is not None and self.temperature != 1.0)
            or bool(self.top_k)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
            or bool(self.min_p)
        )
        return not (self.do_sample or warped)

    def validate(self) -> None:
        """Raise `InvalidRequest` naming the first field out of its range (ranges as LoRAX and OpenAI define them)."""
        _check(self.max_new_tokens is None or self.max_new_tokens > 0, "`max_new_tokens` must be strictly positive")
        _check(self.temperature is None or self.temperature >= 0, "`temperature` must be >= 0")
        _check(self.top_k is None or self.top_k >= 0, "`top_k` must be >= 0 (0 disables it)")
        _check(self.top_p is None or 0 < self.top_p <= 1, "`top_p` must be > 0.0 and <= 1.0")
        _check(self.typical_p is None or 0 < self.typical_p <= 1, "`typical_p` must be > 0.0 and <= 1.0")
        _check(self.min_p is None or 0 <= self.min_p <= 1, "`min_p` must be >= 0.0 and <= 1.0")
        _check(self.repetition_penalty is None or self.repetition_penalty > 0, "`repetition_penalty` must be > 0")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(value is None or -2 <= value <= 2, f"`{name}` must be >= -2.0 and <= 2.0")
        _check(self.seed is None or 0 <= self.seed < 2**64, "`seed` must be an unsigned 64-bit integer")
        _check(all(isinstance(s, str) and s for s in self.stop), "`stop` sequences must be non-empty strings")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "`logprobs` must be >= 0 and <= 20")
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "`prompt_logprobs` must be in 0..20")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequest(message)
