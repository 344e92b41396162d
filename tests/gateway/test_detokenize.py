from __future__ import annotations

import pytest

from gateway.backends.detokenize import IncrementalDetokenizer, StopStrings

TEXTS = ["Hello, world!", "café naïve 東京 🎉 déjà vu", "  leading spaces\nand lines\n", "😀😃😄"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_rebuilds_text_without_partial_chars(tokenizer, text) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_flush_renders_an_incomplete_character(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits the emoji
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(ids[0]) == ""
    assert detok.flush() == "\ufffd"


@pytest.mark.parametrize(
    ("pieces", "stops", "sent", "hit"),
    [
        (["Hello wor", "ld", " and more"], ("world",), "Hello ", True),
        (["ab", "c"], ("abc", "x"), "", True),
        (["no stop here"], ("zzz",), "no stop he", False),  # holds back len-1 chars
        (["plain"], (), "plain", False),
        (["a<", "/s", ">tail"], ("</s>",), "a", True),
    ],
)
def test_stop_strings_never_leak(pieces, stops, sent, hit) -> None:  # type: ignore[no-untyped-def]
    s = StopStrings(stops)
    out, got_hit = "", False
    for p in pieces:
        text, got_hit = s.feed(p)
        out += text
        if got_hit:
            break
    assert (out, got_hit) == (sent, hit)
    if not hit:
        assert out + s.flush() == "".join(pieces)
