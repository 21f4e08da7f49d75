"""Incremental detokenization for streaming, with stop strings matched on the text.

`tokenizers.decoders.DecodeStream`, primed with the prompt ids, releases text only once a character is complete, so
no chunk ever holds half a UTF-8 sequence, and leading-space rules see the prompt as context. Stop strings can span
token boundaries: the last `len(longest stop) - 1` characters are held back until they can no longer begin a stop
string, so a stop string is never streamed and then retracted.

Stop text: LoRAX/TGI keep the matched stop sequence at the end of `generated_text` (`include_stop_in_output=True`,
the default); OpenAI's APIs drop it (`False`). Either way nothing after the stop string is ever released.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

# The error `DecodeStream.step` raises when its buffered prefix no longer decodes to a prefix of the new text (a
# non-monotonic decoder); vLLM resets the stream on it (vllm-project/vllm#17448).
INVALID_PREFIX_ERROR = "Invalid prefix encountered"


class IncrementalDetokenizer:
    """Turns generated token ids into releasable text, one token at a time.

    `push(id)` returns the text the token makes safe to stream (possibly ""), `flush()` the held-back tail when the
    request ends for another reason than a stop string, `text` everything released, `stopped` the matched stop string.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool,
        stop: Sequence[str],
        include_stop_in_output: bool = True,
    ) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens, ids=list(prompt_token_ids))
        self._stop = list(stop)
        self._include_stop = include_stop_in_output
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._decoded = ""  # everything decoded so far
        self._released = 0  # characters of _decoded already handed out
        self.stopped: str | None = None  # the stop string that ended generation, if any

    @property
    def text(self) -> str:
        """All text released so far (after a stop: the final text, cut at the stop string)."""
        return self._decoded[: self._released]

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text it makes safe to release ("" while held back)."""
        if self.stopped is not None:
            return ""
        chunk = self._step(token_id)
        if not chunk:
            return ""
        search_from = max(0, len(self._decoded) - self._hold)
        self._decoded += chunk
        if self._stop:
            end = self._find_stop(search_from)
            if end is not None:
                return self._release(end)
        return self._release(max(self._released, len(self._decoded) - self._hold))

    def flush(self) -> str:
        """Release the held-back tail when generation ends for a reason other than a stop string."""
        if self.stopped is not None:
            return ""
        return self._release(len(self._decoded))

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as error:  # the tokenizer raises a bare Exception
            if not str(error).startswith(INVALID_PREFIX_ERROR):
                raise
            # Restart the stream from this token, as vLLM does: the text already released stays valid.
            self._stream = DecodeStream(skip_special_tokens=self._skip)
            return self._stream.step(self._backend, token_id)

    def _find_stop(self, search_from: int) -> int | None:
        """Earliest stop string ending in the newly decoded text; sets `stopped` and returns where the text ends."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self._decoded.find(stop, search_from)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, self.stopped = best
        return index + len(self.stopped) if self._include_stop else index

    def _release(self, end: int) -> str:
        released = self._decoded[self._released : end]
        self._released = end
        if self.stopped is not None:
            self._decoded = self._decoded[:end]
        return released
