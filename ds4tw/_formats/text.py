"""
Raw token bytes to sendable, typed text.

Two things make a token's bytes unsafe to send at once: they may be half
of a UTF-8 character, or they may be the start of a stop sequence that
the client must never see. L{TextAssembler} holds back exactly those bytes
and no more, so everything else streams the moment it is decoded.

The reasoning and tool-call parsers then hold back what could be half of
a tag (L{ds4tw._formats.pipeline}). All of it runs in the worker thread, so that
a matched stop sequence ends decoding before the next token is computed.

Covered by tests/unit/test_text.py.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def held_suffix(text: str, stops: Sequence[str]) -> int:
    """
    Length of the longest suffix of C{text} that is a proper prefix of
    some stop string: the part that could still grow into a match.
    """
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class StopMatcher:
    """
    Finds stop strings in a stream of text pieces, emitting only text
    that is certain not to belong to a match.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """
        Add C{text}; return (text safe to emit, the stop string matched or
        None). After a match the rest of the stream is to be dropped.
        """
        if not self._stops:
            return text, None
        buf = self._held + text
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = buf.find(stop)
            if at != -1 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self._held = ""
            return buf[: first[0]], first[1]
        keep = held_suffix(buf, self._stops)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """The stream ended without a match: the held text is plain text."""
        held, self._held = self._held, ""
        return held


class TextAssembler:
    """
    Token bytes in, sendable text out: incremental UTF-8 decoding, then
    stop-string matching.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)

    def feed(self, piece: bytes) -> tuple[str, str | None]:
        """(text safe to send, the stop string matched or None)."""
        text = self._decoder.decode(piece)
        if not text:
            return "", None
        return self._stops.feed(text)

    def finish(self, stopped: bool) -> str:
        """
        End of stream: release what was held (a broken character as
        U+FFFD), unless a stop sequence ended it (then the held text was
        the start of that match).
        """
        if stopped:
            return ""
        tail = self._decoder.decode(b"", final=True)
        out, stop = self._stops.feed(tail) if tail else ("", None)
        return out if stop is not None else out + self._stops.flush()
