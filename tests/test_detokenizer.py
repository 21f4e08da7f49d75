"""Streaming detokenization: pieces concatenate to the full decode, never split a character, and cut at stop strings
without ever streaming (and then retracting) any part of one."""

from __future__ import annotations

import pytest
from tiny_models import build_tokenizer

from loraserve.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    " Straße, café and naïve",
    " 東京 🙂 — multi-byte text",
    "🙂🙂 東京東京 éé",
    "  two leading spaces, then words",
    '{"name": "loraserve", "ok": true}',
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.push(token) for token in ids]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_full_decode(tokenizer, text: str) -> None:
    prompt = tokenizer.encode("Once upon a time")
    output = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True, stop=[])
    pieces = stream(detokenizer, output)
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == tokenizer.decode(output) == text == detokenizer.text
    assert all("\ufffd" not in piece for piece in pieces), "a piece holds half a UTF-8 character"
    # byte-level BPE splits the CJK characters and the emoji over several tokens: some pushes must release nothing
    if any(ord(c) > 0x2FFF for c in text):
        assert "" in pieces[:-1]


def test_leading_space_of_the_first_output_token_is_kept_after_the_prompt(tokenizer) -> None:
    prompt = tokenizer.encode("The quick brown")
    output = tokenizer.encode(" fox jumps", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True, stop=[])
    first = detokenizer.push(output[0])
    assert first.startswith(" ")
    assert first + "".join(stream(detokenizer, output[1:])) + detokenizer.flush() == " fox jumps"


TEXT = " the lazy dog jumps over the quick brown fox, 東京 🙂 café"
STOPS = ["jumps ov", "lazy d", "y dog j", " fox,", "東京", "🙂 c", "x", "é"]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop", STOPS)
def test_stop_strings_are_cut_and_never_streamed(tokenizer, stop: str, include: bool) -> None:
    output = tokenizer.encode(TEXT, add_special_tokens=False)
    index = TEXT.index(stop)
    expected = TEXT[: index + len(stop)] if include else TEXT[:index]
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Once"), skip_special_tokens=True,
                                         stop=["never appears", stop], include_stop_in_output=include)
    streamed = ""
    for token in output:
        streamed += detokenizer.push(token)
        assert expected.startswith(streamed), "released text was not a prefix of the final text"
        if not include:
            assert stop not in streamed
        if detokenizer.stopped:
            break
    assert detokenizer.stopped == stop
    assert streamed == detokenizer.text == expected
    assert detokenizer.flush() == "" and detokenizer.push(output[-1]) == "" and detokenizer.text == expected


def test_a_stop_string_split_across_tokens_is_held_back(tokenizer) -> None:
    stop = "jumps ov"
    output = tokenizer.encode(" the lazy dog jumps over", add_special_tokens=False)
    pieces = [tokenizer.decode([t]) for t in output]
    assert not any(stop in piece for piece in pieces), "the test needs the stop string spread over several tokens"
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=[stop],
                                         include_stop_in_output=False)
    streamed = ""
    for token in output:
        streamed += detokenizer.push(token)
        assert not streamed.endswith(("j", "ju", "jum", "jump", "jumps", "jumps "))
    assert detokenizer.stopped == stop and streamed == " the lazy dog "


def test_the_earliest_stop_string_wins(tokenizer) -> None:
    output = tokenizer.encode(" the lazy dog jumps over", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=["dog", "lazy d"])
    streamed = "".join(stream(detokenizer, output))
    assert detokenizer.stopped == "lazy d"
    assert streamed == detokenizer.text == " the lazy d"  # LoRAX keeps the stop text (the default)


def test_flush_releases_held_back_text(tokenizer) -> None:
    output = tokenizer.encode(" abc", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=["never appears"])
    streamed = "".join(stream(detokenizer, output))
    assert len(streamed) < len(" abc")
    assert streamed + detokenizer.flush() == " abc" == detokenizer.text
    assert detokenizer.flush() == ""


def test_partial_stop_match_at_the_end_is_released_by_flush(tokenizer) -> None:
    output = tokenizer.encode(" the lazy dog jum", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=["jumps"])
    streamed = "".join(stream(detokenizer, output))
    assert "jum" not in streamed and detokenizer.stopped is None
    assert streamed + detokenizer.flush() == " the lazy dog jum"


def test_special_tokens_are_skipped_or_kept(tokenizer) -> None:
    ids = tokenizer.encode(" hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    skipping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=[])
    keeping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False, stop=[])
    assert "".join(stream(skipping, ids)) + skipping.flush() == " hi"
    assert "".join(stream(keeping, ids)) + keeping.flush() == " hi<eos>"


class _Failing:
    """Stands in for a DecodeStream whose state broke: raises `error` on its next step."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def step(self, tokenizer, token_id):
        raise self.error


def test_an_invalid_prefix_resets_the_stream_and_decoding_goes_on(tokenizer) -> None:
    output = tokenizer.encode(" the lazy dog", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=[])
    first = "".join(stream(detokenizer, output[:2]))
    detokenizer._stream = _Failing(Exception("Invalid prefix encountered while decoding stream"))
    rest = "".join(stream(detokenizer, output[2:])) + detokenizer.flush()
    assert first + rest == " the lazy dog"


def test_other_decoder_errors_propagate(tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True, stop=[])
    detokenizer._stream = _Failing(Exception("something else"))
    with pytest.raises(Exception, match="something else"):
        detokenizer.push(5)
