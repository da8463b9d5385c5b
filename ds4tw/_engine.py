"""
The engine interface: what the worker asks of a model.

An engine owns one model and its context. Everything here except
L{Engine.apply_chat_template} and L{Engine.tokenize} runs only in the
model's worker thread, so an implementation needs no locking of its own.

Generation is a generator of L{PrefillProgress} and L{Token} events: the
worker pulls one event at a time and checks the job's cancel flag before
every pull, so an engine gets cancellation for free at every prefill
batch and before every token, simply by yielding there. Closing the
generator (C{GeneratorExit}) is the cancel signal an engine sees.

Inside a step, an engine may also watch the job's L{AbortFlag}: a byte
in C memory that the reactor sets on cancel and native code can read
without the GIL. L{LlamaEngine} hands it to llama.cpp's abort callback,
so a disconnect stops a prefill batch or a decode step within
milliseconds; the engine then raises L{Aborted} from the generator.

Covered by tests/unit/test_cancel.py (through the scripted engine) and
tests/integration/test_llama_engine.py (the real one).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

#: Why generation ended, as the engine sees it (the worker adds
#: C{"tool_calls"} when the text held complete calls).
FinishReason = Literal["stop", "length"]


class Aborted(Exception):
    """
    Raised from L{Engine.generate} when its L{AbortFlag} stopped a step
    in the middle (the step's work is undone: the engine is ready for the
    next request as if the step had never started).
    """


class AbortFlag:
    """
    A cancel flag that native code can read without Python: a 2-byte C
    buffer, C{b"\\0\\0"} when clear and C{b"\\1\\0"} when set, so
    C{strlen(address)} is exactly the flag (0 or 1). That is how
    L{ds4tw._llama} checks it from ggml's thread between graph nodes
    (libc's C{strlen} as llama.cpp's abort callback; see its
    C{_abort_callback}).

    L{set} is called in the reactor thread; the model thread (and C)
    only read it. A single byte store: no lock is needed.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = ctypes.create_string_buffer(2)

    def set(self) -> None:
        self._buf[0] = b"\x01"

    def clear(self) -> None:
        self._buf[0] = b"\x00"

    @property
    def is_set(self) -> bool:
        return self._buf.raw[0] != 0

    @property
    def address(self) -> int:
        """The buffer's address (valid as long as this object lives)."""
        return ctypes.addressof(self._buf)


@dataclass(frozen=True)
class Grammar:
    r"""
    A GBNF grammar that constrains sampling (llama.cpp's grammar syntax).

    With no C{triggers} it applies from the first sampled token. With
    triggers it is lazy: sampling is free until one of the regular
    expressions matches the text generated so far, and from then on the
    grammar applies, fed the text from the start of the pattern's first
    capture group (or of the whole match) onwards, so its root must
    accept that text too. That is how a tool call is constrained only
    once the model opens one.

    Triggers are searched only near the end of the text, in the last
    L{TRIGGER_WINDOW} characters before the newest token plus that token
    (each token can only complete a match there), so a pattern must match
    within that window: a marker, not C{[\s\S]*}-wrapped full-text
    patterns (searching the whole text every token is quadratic; measured,
    1.4 s per token at 8,000 characters of reply for such a pattern).

    C{armed}, when given, is asked before each search (in the model
    thread): while it says no, the text is not searched and can never
    match later (the tool-call parser disarms the trigger inside a
    reasoning block, where a quoted marker is not a call).
    """

    gbnf: str
    root: str = "root"
    triggers: tuple[str, ...] = ()
    armed: Callable[[], bool] | None = field(default=None, compare=False)


#: How far back a lazy trigger's search reaches (characters).
TRIGGER_WINDOW = 256


@dataclass(frozen=True)
class SamplingParams:
    """
    What a request asks of the sampler. Defaults follow llama.cpp's server.
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    #: Constrain sampling (forced tool calls, structured output).
    grammar: Grammar | None = None
    #: Report log probabilities: None for none, 0 for the sampled token's
    #: only, N for it and the N most likely tokens at that position.
    logprobs: int | None = None


@dataclass(frozen=True)
class PrefillProgress:
    """
    Prompt processing advanced: C{done} of C{total} prompt tokens are in
    the KV cache, C{cached} of them were reused from an earlier request.
    """

    done: int
    total: int
    cached: int


@dataclass(frozen=True)
class Token:
    """
    One sampled token and its raw bytes (possibly part of a UTF-8
    character; the text layer reassembles).

    When L{SamplingParams.logprobs} is set, C{logprob} is the token's log
    probability under the model's own distribution at that position
    (log-softmax of the logits, before any sampler or grammar changed
    them), and C{top_logprobs} the most likely tokens there as
    C{(id, piece, logprob)}, most likely first.
    """

    id: int
    piece: bytes
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, bytes, float], ...] = ()


EngineEvent = PrefillProgress | Token


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat prompt: the text and any extra stop strings."""

    text: str
    stop: tuple[str, ...] = field(default=())


@runtime_checkable
class Engine(Protocol):
    """
    One loaded model. See the module docstring for the threading rules.
    """

    #: The name clients use for the model (C{/v1/models}).
    model_id: str

    @property
    def n_ctx(self) -> int:
        """Context size in tokens (valid after L{load})."""

    @property
    def chat_template(self) -> str:
        """
        The Jinja source of the chat template in use (valid after L{load});
        tool calling reads it to learn what the template can render.
        """

    def load(self) -> None:
        """Load the model (worker thread; may take seconds)."""

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], **template_kwargs: Any
    ) -> ChatPrompt:
        """
        Render messages with the model's chat template (any thread). The
        keyword arguments are template variables (C{tools},
        C{enable_thinking}, ...).
        """

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Tokenize, parsing special tokens (any thread, after L{load})."""

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, abort: AbortFlag | None = None
    ) -> Generator[EngineEvent, None, FinishReason]:
        """
        Prefill C{prompt} and decode up to C{params.max_tokens} tokens.

        C{abort}, when given, may be watched inside a step: once it is set
        the engine may stop the step it is in and raise L{Aborted} (it
        never raises L{Aborted} while the flag is clear).

        Yields L{PrefillProgress} after every prefill batch and a L{Token}
        for every sampled token; returns C{"stop"} at an end-of-generation
        token (which is not yielded) and C{"length"} at max_tokens or a
        full context. Stop strings are the worker's business, not this.
        """

    def close(self) -> None:
        """Free the model (worker thread)."""
