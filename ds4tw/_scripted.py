"""
A scripted L{Engine}: replies and prefill batches under the caller's
control, no model needed. Public as L{ds4tw.testing.ScriptedEngine}.

Tokenization is one token per character, so prompt lengths are easy to
reason about in tests; the chat template is ChatML unless another Jinja
template is given, and it is rendered exactly as the real engine renders
its own (L{ds4tw._template.ChatTemplate}). With C{logprobs} asked for,
every token reports a log probability of L{TOKEN_LOGPROB} and
alternatives below it.

Every unit of work the engine "computes" is appended to L{computed}, so a
test can assert exactly how much work ran before a cancel took effect.
The job's L{AbortFlag} is checked at the start of every step (a step
found aborted is not computed and raises L{Aborted}), and L{step_hook},
when set, is called there first, so a test can set the flag "in the
middle" of a step, as the reactor does beside a real engine.

Covered by tests/unit/test_exports.py (the Engine protocol) and used by most
unit tests (tests/unit/conftest.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._engine import (
    Aborted,
    AbortFlag,
    ChatPrompt,
    EngineEvent,
    FinishReason,
    PrefillProgress,
    SamplingParams,
    Token,
)
from ._template import CHATML_TEMPLATE, ChatTemplate

#: The log probability of every scripted token, when logprobs are asked.
TOKEN_LOGPROB = -0.25


@dataclass(frozen=True)
class Reply:
    """
    One scripted answer: the raw byte pieces to emit, one per token, and
    whether it ends with an end-of-generation token (C{"stop"}) or simply
    runs out (then the engine pads with C{filler} up to max_tokens).
    """

    pieces: tuple[bytes, ...]
    eos: bool = True
    filler: bytes = b" x"

    @classmethod
    def of(cls, *pieces: str | bytes, eos: bool = True) -> Reply:
        return cls(tuple(p.encode() if isinstance(p, str) else p for p in pieces), eos)

    @classmethod
    def words(cls, text: str, eos: bool = True) -> Reply:
        """Split C{text} into word-sized pieces, keeping the spaces."""
        parts: list[str] = []
        for i, word in enumerate(text.split(" ")):
            parts.append(word if i == 0 else " " + word)
        return cls.of(*[p for p in parts if p], eos=eos)


class ScriptedEngine:
    """
    An L{Engine} that plays back L{Reply}s in order (the last one repeats).

    @param prefill_batch: prompt tokens per prefill step.
    """

    def __init__(
        self,
        replies: Iterable[Reply | str] = ("Hello from the scripted engine.",),
        *,
        n_ctx: int = 4096,
        prefill_batch: int = 64,
        model_id: str = "scripted",
        chat_template: str = CHATML_TEMPLATE,
    ) -> None:
        self.model_id = model_id
        self._n_ctx = n_ctx
        self.prefill_batch = prefill_batch
        self._replies: deque[Reply] = deque(
            r if isinstance(r, Reply) else Reply.words(r) for r in replies
        )
        self._template = ChatTemplate(chat_template, eos_token="<|im_end|>")
        self.loaded = False
        self.closed = False
        #: Work done, in order: ("prefill", tokens_done), ("token", index),
        #: ("closed", None) when a generation is abandoned mid-way.
        self.computed: list[tuple[str, int | None]] = []
        #: Called with the step about to be computed (C{("prefill", done)}
        #: or C{("token", index)}) before the abort check.
        self.step_hook: Callable[[tuple[str, int]], None] | None = None
        #: Prompts and params of every generate() call.
        self.calls: list[tuple[list[int], SamplingParams]] = []
        #: Keyword arguments of every apply_chat_template() call.
        self.template_kwargs: list[dict[str, Any]] = []
        #: Messages of every apply_chat_template() call.
        self.template_messages: list[list[dict[str, Any]]] = []
        #: Appended to every rendered chat prompt (e.g. "<think>\n", as
        #: templates that force thinking on do).
        self.generation_prompt_suffix = ""

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def chat_template(self) -> str:
        return self._template.source

    def add_reply(self, reply: Reply | str) -> None:
        self._replies.append(reply if isinstance(reply, Reply) else Reply.words(reply))

    def load(self) -> None:
        self.loaded = True

    def close(self) -> None:
        self.closed = True

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], **template_kwargs: Any
    ) -> ChatPrompt:
        self.template_kwargs.append(dict(template_kwargs))
        self.template_messages.append([dict(m) for m in messages])
        chat = self._template.render(messages, **template_kwargs)
        return ChatPrompt(chat.text + self.generation_prompt_suffix, chat.stop)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return ([1] if add_bos else []) + [ord(c) for c in text]

    def _next_reply(self) -> Reply:
        if len(self._replies) > 1:
            return self._replies.popleft()
        return self._replies[0]

    @staticmethod
    def _token(token_id: int, piece: bytes, logprobs: int | None) -> Token:
        if logprobs is None:
            return Token(token_id, piece)
        top = [(token_id, piece, TOKEN_LOGPROB)]
        top += [(i, f" alt{i}".encode(), TOKEN_LOGPROB - i) for i in range(1, logprobs)]
        return Token(token_id, piece, TOKEN_LOGPROB, tuple(top[:logprobs]))

    def _step(self, step: tuple[str, int], abort: AbortFlag | None) -> None:
        if self.step_hook is not None:
            self.step_hook(step)
        if abort is not None and abort.is_set:
            raise Aborted
        self.computed.append(step)

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, abort: AbortFlag | None = None
    ) -> Generator[EngineEvent, None, FinishReason]:
        self.calls.append((list(prompt), params))
        reply = self._next_reply()
        total = len(prompt)
        finished = False
        try:
            for done in range(0, total, self.prefill_batch):
                n = min(done + self.prefill_batch, total)
                self._step(("prefill", n), abort)
                yield PrefillProgress(n, total, 0)
            for i in range(params.max_tokens):
                if i < len(reply.pieces):
                    piece = reply.pieces[i]
                elif reply.eos and not params.ignore_eos:
                    finished = True
                    return "stop"
                else:
                    piece = reply.filler
                self._step(("token", i), abort)
                yield self._token(1000 + i, piece, params.logprobs)
            finished = True
            return "length"
        finally:
            if not finished:
                self.computed.append(("closed", None))
