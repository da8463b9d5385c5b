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

Covered by tests/unit/test_worker.py (through the scripted engine) and
tests/integration/test_llama_engine.py (the real one).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


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
    """

    id: int
    piece: bytes


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

    def load(self) -> None:
        """Load the model (worker thread; may take seconds)."""

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], **template_kwargs: Any
    ) -> ChatPrompt:
        """Render messages with the model's chat template (any thread)."""

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Tokenize, parsing special tokens (any thread, after L{load})."""

    def generate(
        self, prompt: Sequence[int], params: SamplingParams
    ) -> Generator[EngineEvent, None, FinishReason]:
        """
        Prefill C{prompt} and decode up to C{params.max_tokens} tokens.

        Yields L{PrefillProgress} after every prefill batch and a L{Token}
        for every sampled token; returns C{"stop"} at an end-of-generation
        token (which is not yielded) and C{"length"} at max_tokens or a
        full context. Stop strings are the worker's business, not this.
        """

    def close(self) -> None:
        """Free the model (worker thread)."""
