"""
The model thread's text pipeline: one sampled token in, typed output
events out.

    token bytes -> UTF-8 and stop sequences (L{ds4tw._formats.text})
                -> reasoning / content (L{ds4tw._formats.reasoning})
                -> content / tool calls (L{ds4tw._formats.tools.parsers})
                -> L{ds4tw._types.Output} events, logprobs attached

Each stage holds back only what it must (half a character, the start of
a stop sequence, half a tag or marker), so everything else reaches the
client the moment it is decoded. The pipeline runs in the model thread:
a matched stop sequence, or the end of the one call a request allowed,
ends decoding before the next token is computed.

Logprobs: each token's entry waits until the text it produced is
released, and goes out with the first content text released with it;
tokens whose text became reasoning or tool-call markup, or was cut by a
stop sequence, report none (OpenAI's C{logprobs.content} is the
content's).

Covered by tests/unit/test_pipeline.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from .._engine.interface import Token
from .._types import ContentText, Output, TokenLogprob
from .reasoning import PlainSplitter, ReasoningSplitter
from .text import TextAssembler
from .tools.parsers import ToolCallSplitter


@dataclass(frozen=True)
class Fed:
    outputs: list[Output]
    #: The stop string that ended the text, if one matched.
    stop: str | None = None
    #: The one tool call the request allowed is complete: stop decoding.
    call_done: bool = False


def _piece_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


class OutputPipeline:
    """
    @param tools: the tool-call splitter, when the request offers tools.
    @param single_call: stop after the first complete call (no parallel calls).
    """

    def __init__(
        self,
        stops: tuple[str, ...] = (),
        reasoning: ReasoningSplitter | None = None,
        tools: ToolCallSplitter | None = None,
        *,
        single_call: bool = False,
    ) -> None:
        self._text = TextAssembler(stops)
        self.reasoning: ReasoningSplitter = reasoning or PlainSplitter()
        self._tools = tools
        self._single_call = single_call
        self._pending: list[TokenLogprob] = []

    @property
    def in_reasoning(self) -> bool:
        return self.reasoning.in_reasoning

    @property
    def calls(self) -> int:
        """Tool calls completed so far."""
        return self._tools.calls if self._tools is not None else 0

    def feed(self, token: Token) -> Fed:
        if token.logprob is not None:
            self._pending.append(
                TokenLogprob(
                    _piece_text(token.piece),
                    token.piece,
                    token.logprob,
                    tuple((_piece_text(p), p, lp) for _, p, lp in token.top_logprobs),
                )
            )
        text, stop = self._text.feed(token.piece)
        outputs = self._split(text) if text else []
        if stop is not None:
            self._pending.clear()  # those tokens were the stop sequence
        outputs = self._attach(outputs)
        done = self._single_call and self.calls > 0
        return Fed(outputs, stop, done)

    def finish(self, stopped: bool) -> list[Output]:
        """The end of the stream: release what every stage held."""
        tail = self._text.finish(stopped)
        outputs = self._split(tail) if tail else []
        outputs += self._route(self.reasoning.flush())
        if self._tools is not None:
            outputs += self._tools.flush()
        return self._attach(outputs)

    def _split(self, text: str) -> list[Output]:
        return self._route(self.reasoning.feed(text))

    def _route(self, parts: Sequence[Output]) -> list[Output]:
        if self._tools is None:
            return list(parts)
        out: list[Output] = []
        for part in parts:
            if isinstance(part, ContentText):
                out += self._tools.feed(part.text)
            else:
                out.append(part)
        return out

    def _attach(self, outputs: list[Output]) -> list[Output]:
        if not self._pending or not outputs:
            return outputs
        for i, event in enumerate(outputs):
            if isinstance(event, ContentText):
                outputs[i] = replace(event, logprobs=tuple(self._pending))
                break
        self._pending.clear()
        return outputs
