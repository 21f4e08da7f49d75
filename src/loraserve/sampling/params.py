"""Sampling parameters with LoRAX/TGI and OpenAI semantics, and their validation.

Greedy or sampled (`SamplingParams.greedy`) follows LoRAX's Python server (TGI's `NextTokenChooser`): sampling is on
when `do_sample` is set or any warper differs from its neutral value (temperature not 1, top_k > 0, top_p < 1,
typical_p < 1, and here also min_p > 0); temperature 0 always means greedy, as in OpenAI's API, even with
`do_sample`. Penalties apply in both modes. `None` in any numeric field means the neutral value, so a request that
leaves a field out never changes the decoding mode.

Ranges (`validate`): LoRAX's router ranges, loosened only where the loose value is the neutral one: `top_k` 0 (and
vLLM's -1) means disabled where LoRAX asks for > 0, and `typical_p` 1.0 means disabled where LoRAX asks for < 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loraserve.errors import InvalidRequest
from loraserve.sampling.grammar import GrammarSpec

MAX_LOGPROBS = 20  # top-n alternatives per token (OpenAI's top_logprobs limit, vLLM's default max_logprobs)


@dataclass
class SamplingParams:
    max_new_tokens: int | None = None  # None: up to the request's token limit (LoRAX's default, not TGI's 20)
    temperature: float | None = None  # None = 1.0; 0 = greedy
    top_k: int | None = None  # None, 0 or -1 = disabled
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
    logprobs: int | None = None  # top-n alternatives per token (implies chosen_logprob); 0 = an empty list
    prompt_logprobs: int | None = None  # None: none; n >= 0: each prompt token's logprob plus top-n alternatives
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None  # the output must match this JSON schema / JSON object / regex

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax of the (penalized) logits.

        Temperature 0 -> greedy, always. Otherwise sampled when `do_sample` is set or any warper is active
        (temperature != 1, top_k > 0, top_p < 1, typical_p < 1, min_p > 0); greedy when none is.
        """
        if self.temperature == 0:
            return True
        warped = (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k > 0)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
            or (self.min_p is not None and self.min_p > 0.0)
        )
        return not (self.do_sample or warped)

    def validate(self) -> None:
        """Raise `InvalidRequest` naming the first field out of its range (ranges as LoRAX and OpenAI define them)."""
        _check(self.max_new_tokens is None or (_is_int(self.max_new_tokens) and self.max_new_tokens > 0),
               "`max_new_tokens` must be strictly positive")
        _check(_number_or_none(self.temperature) and (self.temperature is None or self.temperature >= 0),
               "`temperature` must be >= 0")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= -1),
               "`top_k` must be strictly positive (0 or -1 disable it)")
        _check(_number_or_none(self.top_p) and (self.top_p is None or 0 < self.top_p <= 1),
               "`top_p` must be > 0.0 and <= 1.0")
        _check(_number_or_none(self.typical_p) and (self.typical_p is None or 0 < self.typical_p <= 1),
               "`typical_p` must be > 0.0 and <= 1.0")
        _check(_number_or_none(self.min_p) and (self.min_p is None or 0 <= self.min_p <= 1),
               "`min_p` must be >= 0.0 and <= 1.0")
        penalty = self.repetition_penalty
        _check(_number_or_none(penalty) and (penalty is None or penalty > 0),
               "`repetition_penalty` must be strictly positive")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(_number_or_none(value) and (value is None or -2 <= value <= 2),
                   f"`{name}` must be >= -2.0 and <= 2.0")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64),
               "`seed` must be an unsigned 64-bit integer (0 to 2^64 - 1)")
        _check(isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) and s for s in self.stop),
               "`stop` must be a list of non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               "`stop_token_ids` must be non-negative integers")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"`logprobs` must be >= 0 and <= {MAX_LOGPROBS}")
        prompt = self.prompt_logprobs
        _check(prompt is None or (_is_int(prompt) and 0 <= prompt <= MAX_LOGPROBS),
               f"`prompt_logprobs` must be >= 0 and <= {MAX_LOGPROBS}")
        _check(self.grammar is None or isinstance(self.grammar, GrammarSpec), "`grammar` must be a GrammarSpec")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number_or_none(value: object) -> bool:
    """None, or a finite int/float (NaN and infinities are rejected by every range check)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequest(message)
