"""Streaming detokenization: pieces concatenate to the full decode, never split a character, and cut at stop strings."""

from __future__ import annotations

import pytest
from tiny_models import build_tokenizer

from loraserve.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    " Straße, café and naïve",
    " 東京 🙂 — multi-byte text",
    "  two leading spaces, then words",
    '{"name": "loraserve", "ok": true}',
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_full_decode(tokenizer, text: str) -> None:
    prompt = tokenizer.encode("Once upon a time")
    output = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True, stop=[])
    pieces = [detokenizer.push(token) for token in output]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(output) == text
    assert all("\ufffd" not in piece for piece in pieces), "a piece holds half a UTF-8 character"
    # byte-level BPE splits the CJK characters and the emoji over several tokens: some pushes must release nothing
    if any(ord(c) > 0x2FFF for c in text):
        assert "" in pieces[:-1]


def test_stop_string_across_tokens_is_never_streamed(tokenizer) -> None:
    text = " the lazy dog jumps over the quick brown fox"
    output = tokenizer.encode(text, add_special_tokens=False)
    stop = "jumps ov"
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=[stop],
                                         include_stop_in_output=False)
    streamed = ""
    for token in output:
        streamed += detokenizer.push(token)
        assert stop not in streamed and not streamed.endswith("jump")
        if detokenizer.stopped:
            break
    assert detokenizer.stopped == stop
    assert streamed == detokenizer.text == " the lazy dog "
    assert detokenizer.flush() == ""


def test_stop_string_kept_when_asked_as_lorax_does(tokenizer) -> None:
    output = tokenizer.encode(" the lazy dog jumps over", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=["dog", "lazy d"])
    streamed = "".join(detokenizer.push(token) for token in output)
    assert detokenizer.stopped == "lazy d"  # the earliest match wins
    assert streamed == detokenizer.text == " the lazy d"


def test_flush_releases_held_back_text(tokenizer) -> None:
    output = tokenizer.encode(" abc", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=["never appears"])
    streamed = "".join(detokenizer.push(token) for token in output)
    assert len(streamed) < len(" abc")
    assert streamed + detokenizer.flush() == " abc"


def test_special_tokens_are_skipped_or_kept(tokenizer) -> None:
    ids = tokenizer.encode(" hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    skipping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=[])
    keeping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False, stop=[])
    assert "".join(skipping.push(t) for t in ids) + skipping.flush() == " hi"
    assert "".join(keeping.push(t) for t in ids) + keeping.flush() == " hi<eos>"
