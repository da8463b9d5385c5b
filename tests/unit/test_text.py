"""Stop-sequence hold-back and UTF-8 reassembly (the worker-side text layer)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ds4tw._formats.text import StopMatcher, TextAssembler


def feed_all(m: StopMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = ""
    for p in pieces:
        text, stop = m.feed(p)
        out += text
        if stop:
            return out, stop
    return out + m.flush(), None


def test_holds_only_what_could_match() -> None:
    m = StopMatcher(["</end>"])
    assert m.feed("abc</") == ("abc", None)
    assert m.feed("en") == ("", None)
    assert m.feed("x") == ("</enx", None)


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(["world", "lo w"])
    assert m.feed("hello world") == ("hel", "lo w")


def test_no_stops_passes_through() -> None:
    assert StopMatcher([]).feed("anything") == ("anything", None)


def test_utf8_split_across_pieces() -> None:
    a = TextAssembler([])
    euro = "€".encode()
    assert a.feed(euro[:1]) == ("", None)
    assert a.feed(euro[1:]) == ("€", None)


def test_broken_utf8_at_the_end_is_replaced_not_dropped() -> None:
    a = TextAssembler([])
    assert a.feed(b"ok\xe2\x82") == ("ok", None)
    assert a.finish(stopped=False) == "\ufffd"


def test_held_stop_prefix_is_dropped_when_the_stream_stopped() -> None:
    a = TextAssembler(["STOP"])
    assert a.feed(b"done ST") == ("done ", None)
    assert a.finish(stopped=False) == "ST"
    b = TextAssembler(["STOP"])
    assert b.feed(b"done STOP") == ("done ", "STOP")
    assert b.finish(stopped=True) == ""


@given(
    text=st.text(min_size=0, max_size=40),
    stop=st.text(min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_any_split_gives_the_same_result_as_no_split(text: str, stop: str, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if c <= len(text)})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=False)]
    whole = feed_all(StopMatcher([stop]), [text])
    split = feed_all(StopMatcher([stop]), pieces)
    assert split == whole
    expected = text.split(stop)[0] if stop in text else text
    assert whole[0] == expected
