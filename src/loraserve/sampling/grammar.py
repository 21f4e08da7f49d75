"""Constrained decoding with llguidance: a grammar spec -> a per-request matcher -> an allowed-token bitmask per step.

One small interface so the backend could change: `GrammarCompiler` (bound to the served tokenizer, one per engine)
turns a `GrammarSpec` into a `GrammarState` (compiling each distinct spec once, LRU-cached); each step
`fill_bitmask` writes the allowed tokens of every constrained row into one int32 bitmask `[N, ceil(V/32)]` (token t
allowed iff bit t % 32 of word t // 32 is set), `apply_bitmask_` sets the other logits to -inf, and the engine
feeds the chosen token back with `GrammarState.consume`.

llguidance was chosen because it refuses JSON-schema keywords it cannot enforce (`uniqueItems`, `not`, `if`) instead
of silently ignoring them; its message becomes an `InvalidRequest`. JSON is compact by default (no whitespace
between tokens, `,` and `:` separators): a model that is free to emit whitespace can pad forever, and every
whitespace token is a decode step. A schema can opt back in with `"x-guidance": {"whitespace_flexible": true}`.
A regex (Rust `regex` syntax) must match the whole output. EOS is allowed exactly where the grammar accepts.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

from loraserve.errors import InvalidRequest

GrammarKind = Literal["json_schema", "json_object", "regex"]
JSON_DEFAULTS = {"whitespace_flexible": False}
_ANY_OBJECT = '{"type":"object"}'


@dataclass(frozen=True)
class GrammarSpec:
    """What the output must match. Hashable: it is the compile cache key.

    `source` is the schema as JSON text (key order kept: llguidance emits properties in schema order) or the regex.
    """

    kind: GrammarKind
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> GrammarSpec:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as error:
                raise InvalidRequest(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest("the JSON schema must be a JSON object")
        try:
            return cls("json_schema", json.dumps(schema, separators=(",", ":"), allow_nan=False))
        except (TypeError, ValueError) as error:
            raise InvalidRequest(f"the JSON schema cannot be serialized: {error}") from None

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequest("the regex must be a non-empty string")
        return cls("regex", pattern)

    def grammar(self) -> str:
        """The llguidance grammar text for this spec (no validation yet)."""
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        schema = self.source if self.kind == "json_schema" else _ANY_OBJECT
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except ValueError as error:
            raise InvalidRequest(f"invalid JSON schema: {error}") from None


class GrammarState:
    """One request's position in its grammar. Fed every generated token exactly once, in order; a recompute after
    preemption keeps the request's tokens and so keeps this state as it is."""

    def __init__(self, matcher: LLMatcher, mask_words: int) -> None:
        self._matcher = matcher
        self.mask_words = mask_words  # int32 words per bitmask row

    def consume(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar rejects it (the state then stays in error)."""
        return self._matcher.consume_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        if not self._matcher.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self._matcher.get_error()}")

    @property
    def is_stopped(self) -> bool:
        """Nothing but EOS can follow (the grammar is complete, EOS was consumed, or the state is in error)."""
        return self._matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this state's allowed tokens into `bitmask[row]` (a contiguous int32 CPU tensor)."""
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())


class GrammarCompiler:
    """Compiles specs for one tokenizer. The llguidance tokenizer (seconds to build for a 262k vocabulary) is built
    by `prepare` (`AsyncEngine.run` calls it in a thread beside the step loop), or else on the first constrained
    request."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int], cache_size: int = 128
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = max(vocab_size, len(tokenizer))  # the logits' width; padded ids are never allowed
        self._eos = sorted(eos_token_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._lltokenizer: LLTokenizer | None = None

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def new_state(self, spec: GrammarSpec) -> GrammarState:
        """A fresh matcher for `spec`; raises `InvalidRequest` with llguidance's reason if it cannot be enforced."""
        return GrammarState(self._compiled(spec).deep_copy(), self.mask_words)

    def _compiled(self, spec: GrammarSpec) -> LLMatcher:
        """A matcher at the start of `spec`, kept as a template: copies of it share the compiled grammar."""
        with self._lock:
            template = self._cache.get(spec)
            if template is not None:
                self._cache.move_to_end(spec)
                return template
            template = LLMatcher(self._ll_tokenizer(), spec.grammar(), log_level=0)
            if template.is_error():
                raise InvalidRequest(f"unsupported {spec.kind.replace('_', ' ')}: {template.get_error()}")
            self._cache[spec] = template
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return template

    def prepare(self) -> None:
        """Build llguidance's tokenizer now (seconds for a 262k vocabulary; blocking, so call it off the event loop)
        instead of on the first constrained request."""
        with self._lock:
            self._ll_tokenizer()

    def _ll_tokenizer(self) -> LLTokenizer:
        if self._lltokenizer is None:
            from llguidance.hf import from_tokenizer  # imports transformers: only where a grammar is used

            self._lltokenizer = from_tokenizer(self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos)
        return self._lltokenizer


def fill_bitmask(states: Sequence[GrammarState | None]) -> torch.Tensor | None:
    """One bitmask row per entry (all ones where the entry is None); None when no entry has a grammar.

    Rows are filled one after the other on this thread: in the engine at batch 32, llguidance's `LLExecutor` thread
    pool took 5-9 ms a step (its threads compete with torch's spinning OpenMP workers), this loop 1.2-1.3 ms. The
    buffer comes from numpy: `torch.full` of the same megabyte took 6-12 ms on a busy machine, numpy 0.03 ms.
    """
    constrained = [(state, row) for row, state in enumerate(states) if state is not None]
    if not constrained:
        return None
    bitmask = torch.from_numpy(np.full((len(states), constrained[0][0].mask_words), -1, dtype=np.int32))
    for state, row in constrained:
        state.fill(bitmask, row)
    return bitmask


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Set the disallowed logits of `rows` to -inf, in place (bitmask row i belongs to logits row i); the other rows
    are not touched. Ids beyond the bitmask are disallowed too.

    On the CPU the work is numpy's, row by row: torch's `masked_fill_` was slower here and waits on OpenMP threads
    when the machine is busy. The float rows are the cost (32 x 262k x 4 bytes), so each is written once, see
    `_mask_row`.
    """
    if not rows:
        return
    vocab = logits.shape[1]
    covered = min(vocab, bitmask.shape[1] * 32)
    words = bitmask.numpy()
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        values = logits.numpy()
        for row in rows:
            _mask_row(values[row, :covered], words[row])
    else:
        disallowed = torch.from_numpy(_unpack(np.invert(words[list(rows)]), covered)).to(logits.device)
        for j, row in enumerate(rows):
            logits[row, :covered].masked_fill_(disallowed[j], float("-inf"))
    if covered < vocab:
        logits[list(rows), covered:] = float("-inf")


def _mask_row(values: np.ndarray, words: np.ndarray) -> None:
    """-inf wherever the bit in `words` is clear. With few tokens allowed (most JSON positions outside strings),
    keep those, then fill the row: a write-only pass, measured twice as fast as writing through a mask, which is
    what rows with many tokens allowed get."""
    live = np.flatnonzero(words)
    if len(live) * 32 <= len(values) // 16:
        bits = _unpack(words[live], 32 * len(live)).reshape(len(live), 32)
        ids = (live[:, None] * 32 + np.arange(32))[bits]
        ids = ids[ids < len(values)]
        kept = values[ids]
        values.fill(-np.inf)
        values[ids] = kept
    else:
        np.copyto(values, -np.inf, where=_unpack(np.invert(words), len(values)))


def _unpack(words: np.ndarray, count: int) -> np.ndarray:
    """int32 words -> one bool per bit (bit t % 32 of word t // 32), `count` bits along the last axis."""
    return np.unpackbits(words.view(np.uint8), axis=-1, count=count, bitorder="little").view(bool)
