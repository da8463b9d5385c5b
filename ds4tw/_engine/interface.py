"""
The engine interface: what the worker asks of a model.

An engine owns one model and one context holding up to L{Engine.slots}
sequences at once. Everything here except L{Engine.prepare},
L{Engine.apply_chat_template}, L{Engine.tokenize} and L{Engine.memory}
runs only in the model's worker thread, so an implementation needs no
locking of its own.

Its life: L{Engine.prepare} (any thread, cheap) makes the prompt side
available without the weights (the tokenizer, the chat template, the
special tokens) and an estimate of the memory a load will take
(L{Engine.memory}, L{MemoryUse}); L{Engine.load} loads the weights and
makes the context, reporting its progress to a callback that can stop it
(L{LoadAborted}); L{Engine.close} frees them again, and a later
L{Engine.load} brings the same engine back (a multi-model server unloads
an idle model and reloads it on demand). The prompt side stays usable
throughout.

The worker schedules steps, not requests (L{ds4tw._runtime.scheduler}): it
L{Engine.open}s a sequence for each admitted request, calls
L{Engine.step} again and again, and L{Engine.release}s a sequence when its
request ends (finished, stopped by a stop string, cancelled or failed).
One step is one forward pass over a batch that holds one token for every
decoding sequence and a bounded chunk of prompt for the prefilling ones
(continuous batching); it returns what each sequence got out of it
(L{PrefillProgress}, a L{Token}, L{Finished} or L{Failed}). Between two
steps is where a cancelled request leaves: the worker simply releases its
sequence.

Inside a step, an engine may also watch an L{AbortFlag}: a byte in C
memory that the reactor sets when every request in the running step has
been cancelled, which native code reads without the GIL. L{LlamaEngine}
hands it to llama.cpp's abort callback, so a lone disconnect stops a
prefill batch or a decode step within milliseconds; the engine then
undoes the step and raises L{Aborted}.

Between two steps the worker may also L{Engine.force} a sequence's next
tokens: written in the model's place instead of sampled (a reasoning
budget closing the reasoning block; L{SamplingParams.reasoning_budget}).

A model's special (control) tokens are no text in the output unless
L{SamplingParams.keep_special} names them: the parsers' markup
(L{special_token_ids} turns the parsers' C{preserved_tokens} into those
ids).

L{generate} runs one request alone on any engine (tests, benchmarks,
embedders that want one answer without a worker).

Covered by tests/unit/test_scheduler.py, tests/unit/test_cancel.py,
tests/unit/test_reasoning_budget.py and tests/unit/test_engine_lifecycle.py
(through the scripted engine) and tests/integration/test_llama_engine.py,
tests/integration/test_batching.py,
tests/integration/test_special_tokens.py and
tests/integration/test_engine_lifecycle.py (the real one).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from .kvcache import CacheStats, PromptCache

# What a chat template renders (defined beside the templates, which the
# prompt cache reads too): part of the interface, as apply_chat_template
# returns it.
from .template import ChatPrompt

#: Why generation ended, as the engine sees it (the scheduler adds
#: C{"tool_calls"} when the text held complete calls).
FinishReason = Literal["stop", "length"]


class Aborted(Exception):
    """
    Raised from L{Engine.step} (and so from L{generate}) when its
    L{AbortFlag} stopped the step in the middle (the step's work is
    undone: the engine is ready for the next step as if this one had never
    started).
    """


class BackendLost(Exception):
    """
    Raised from L{Engine.step} or L{Engine.open} when the model itself is
    gone (the process that held it died: an RPC worker lost, see
    L{ds4tw._engine.process}). Every open sequence is lost with it; the
    engine is as if L{Engine.close}d, and a later L{Engine.load} may bring
    it back. The message says what was lost, for the clients' errors and
    C{/health}.
    """


class LoadAborted(Exception):
    """
    Raised from L{Engine.load} when its progress callback returned False
    (nobody waits for the model any more). The engine is left unloaded and
    clean: nothing of the partial load is kept, and a later L{Engine.load}
    starts over.
    """


@dataclass(frozen=True)
class MemoryUse:
    """
    What a loaded model takes, in bytes (L{Engine.memory}): estimated from
    the model file before the load (C{measured} False), as the backend
    reported it once loaded (C{measured} True).

    @ivar weights: the model's tensors (on every device).
    @ivar kv: the KV cache, all slots.
    @ivar compute: the backend's scratch buffers for a step (the
        compute graph, the logits).
    @ivar cache: the prompt cache's memory tier at its budget (its disk
        tier is not memory).
    """

    weights: int
    kv: int
    compute: int
    cache: int
    measured: bool

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.cache

    def mib(self) -> dict[str, float]:
        """Each part and the total in MiB (for logs and C{/health})."""
        parts = {
            "weights": self.weights,
            "kv": self.kv,
            "compute": self.compute,
            "cache": self.cache,
            "total": self.total,
        }
        return {k: round(v / 2**20, 1) for k, v in parts.items()}


#: What L{Engine.load} reports its progress to: called with the fraction
#: loaded (0 to 1) in the loading thread; returning False stops the load
#: (L{LoadAborted}).
LoadProgress = Callable[[float], bool]


class AbortFlag:
    """
    A cancel flag that native code can read without Python: a 2-byte C
    buffer, C{b"\\0\\0"} when clear and C{b"\\1\\0"} when set, so
    C{strlen(address)} is exactly the flag (0 or 1). That is how
    L{ds4tw._engine.llama} checks it from ggml's thread between graph nodes
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
    #: What the schemas lost on the way to this grammar (L{ds4tw._formats.jsonschema}):
    #: logged once, when it is built.
    loosened: str = field(default="", compare=False)


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
    #: Special (control) tokens whose text is kept: the markup the active
    #: parsers read (gpt-oss's C{<|channel|>}, Kimi's tool-call section).
    #: Every other control token's text stays hidden, as llama-server hides
    #: all but its per-request "preserved tokens" (L{special_token_ids}).
    keep_special: frozenset[int] = frozenset()
    #: Cap the reasoning block at this many tokens (None: no cap). Once a
    #: reply has spent it and is still reasoning, the worker has the
    #: engine write L{reasoning_close} in the model's place
    #: (L{Engine.force}); 0 closes the block at once.
    reasoning_budget: int | None = None
    #: The tokens of the text that ends a reasoning block (the reasoning
    #: parser's C{close}, e.g. C{</think>}).
    reasoning_close: tuple[int, ...] = ()


@dataclass(frozen=True)
class PrefillProgress:
    """
    Prompt processing advanced: C{done} of C{total} prompt tokens are in
    the KV cache, C{cached} of them were reused from an earlier request,
    found in C{source}: C{"slot"} (the sequence's own retained slot),
    C{"copy"} (another slot's), C{"ram"} or C{"disk"} (the prompt cache,
    L{ds4tw._engine.kvcache}), None when nothing was reused.
    """

    done: int
    total: int
    cached: int
    source: str | None = None


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
class Finished:
    """
    The sequence is done: C{"stop"} at an end-of-generation token (which
    is not yielded), C{"length"} at max_tokens or the per-request context
    limit. Stop strings are the worker's business, not the engine's.
    """

    reason: FinishReason


@dataclass(frozen=True)
class Failed:
    """This sequence failed (a sampler error, say); the others go on."""

    error: BaseException


StepEvent = PrefillProgress | Token | Finished | Failed


@dataclass(frozen=True)
class StepResult:
    """
    What one L{Engine.step} did: each sequence's events in order (a
    sequence whose prefill ends in the step gets its L{PrefillProgress}
    and then its first L{Token}), and the batch's shape.
    """

    events: tuple[tuple[int, StepEvent], ...] = ()
    #: The sequences whose tokens were in the batch.
    sequences: tuple[int, ...] = ()
    #: Tokens decoded (one per decoding sequence) and prompt tokens
    #: prefilled in this step.
    decode_tokens: int = 0
    prefill_tokens: int = 0


@runtime_checkable
class Engine(Protocol):
    """
    One loaded model. See the module docstring for the threading rules.
    """

    #: The name clients use for the model (C{/v1/models}).
    model_id: str
    #: Saved prefix states beyond the slots, in memory and on disk (None:
    #: none); C{/metrics} shows its tiers.
    prompt_cache: PromptCache | None

    @property
    def n_ctx(self) -> int:
        """Context size in tokens (per sequence)."""

    @property
    def n_vocab(self) -> int:
        """Token ids are below this (valid after L{prepare})."""

    @property
    def chat_template(self) -> str:
        """
        The Jinja source of the chat template in use (valid after
        L{prepare}); tool calling reads it to learn what the template can
        render.
        """

    def prepare(self) -> None:
        """
        Make the prompt side available without loading the weights (any
        thread; cheap, idempotent): L{tokenize}, L{apply_chat_template},
        L{chat_template}, L{n_vocab}, the special tokens, and the estimate
        of L{memory}. Raises, with a message that names the fix, when the
        model cannot be used at all (a file that does not exist). L{load}
        calls it first when it has not run.
        """

    def load(self, progress: LoadProgress | None = None) -> None:
        """
        Load the model (worker thread; may take seconds). C{progress}, when
        given, is called with the fraction loaded as the backend reports
        it; when it returns False the load stops and raises
        L{LoadAborted}, leaving the engine unloaded. Also loads a model
        that was L{close}d (an unload, then a reload).
        """

    def memory(self) -> MemoryUse:
        """
        What the model takes loaded (any thread): measured once loaded,
        else estimated from the model file (prepares the engine if it was
        not).
        """

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], **template_kwargs: Any
    ) -> ChatPrompt:
        """
        Render messages with the model's chat template (any thread). The
        keyword arguments are template variables (C{tools},
        C{enable_thinking}, ...).
        """

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """
        Tokenize, parsing special tokens (any thread, after L{prepare}; the
        same tokens loaded or not).
        """

    @property
    def slots(self) -> int:
        """How many sequences the context holds, so requests at once."""

    @property
    def cache_stats(self) -> CacheStats:
        """
        Prefix reuse counters: hits by source, misses, and the prompt
        cache's restores and saves (its own when there is one); C{/metrics}
        reads them at scrape time, outside the model thread (plain ints).
        """

    def open(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """
        Start a sequence for C{prompt}; return its id (its slot). The
        engine reuses the longest cached prefix it holds (retained slots
        first). Nothing is computed until the next L{step}. Raises, before
        anything is allocated, if C{params} cannot be served (a grammar
        that does not parse). The caller never opens more than L{slots}.
        """

    def step(self, abort: AbortFlag | None = None) -> StepResult:
        """
        One forward pass for every open, unfinished sequence (continuous
        batching): one token for each decoding sequence, then prompt
        chunks, shortest remaining prompt first, up to the step budget.

        C{abort}, when given, may be watched inside the step: once it is
        set the engine may stop, undo the step (no sequence advances) and
        raise L{Aborted}; it never raises L{Aborted} while it is clear.

        Raises L{BackendLost} (as may L{open}) when the model itself is
        gone: every sequence with it, the engine unloaded.
        """

    def release(self, seq: int, *, keep_output: bool = True) -> None:
        """
        End sequence C{seq}. Its prompt's cells stay as a cache of that
        prefix (a retained slot, evicted least recently used when a new
        sequence needs the slot), and so do the generated tokens' cells
        when C{keep_output} (a finished answer, which the next turn of the
        conversation resends); otherwise they are freed at once.
        """

    def force(self, seq: int, tokens: Sequence[int]) -> None:
        """
        Make C{tokens} the next tokens of sequence C{seq}, one per step, in
        place of sampling (a reasoning budget's closing text). Each is
        emitted as a L{Token} and goes into the KV cache like a sampled
        one, and the sampler takes it as if it had chosen it (repeat
        penalties, a grammar). Called in the model thread between steps;
        tokens still queued from an earlier call come first.
        """

    def close(self) -> None:
        """
        Free the model and its context (worker thread): every sequence is
        released, the prompt cache's memory tier and the slots' prefixes go
        to its disk tier (if it has one) and are dropped from memory. The
        prompt side stays (L{prepare}), and L{load} may run again.
        """


@runtime_checkable
class Probed(Protocol):
    """
    An engine whose backend can be checked while no request runs
    (L{ds4tw._engine.process.ProcessEngine} over RPC workers): the runner
    asks every C{probe_interval} seconds, so that C{/health} turns 503
    when a worker dies between requests, not at the next request.
    """

    #: Seconds between two probes (0: never).
    probe_interval: float

    def probe(self) -> str | None:
        """None while the backend is there, else why it is lost (any thread; cheap)."""


@runtime_checkable
class ReportsSettings(Protocol):
    """
    An engine that can say how its backend took its settings (L{LlamaEngine}:
    GPU layers, flash attention, KV cache types, ...): C{/health} shows them.
    """

    @property
    def settings(self) -> dict[str, Any]:
        """The settings as the backend took them (empty before L{Engine.load})."""


@runtime_checkable
class HasSpecialTokens(Protocol):
    """
    An engine whose vocabulary has special (control) tokens, whose text is
    hidden from the output unless L{SamplingParams.keep_special} names them
    (L{LlamaEngine}; the scripted engine has none and passes text through).
    """

    def is_special(self, token: int) -> bool:
        """Whether C{token}'s text is hidden unless kept."""


def special_token_ids(engine: Engine, texts: Iterable[str]) -> frozenset[int]:
    """
    The ids of the special tokens written as C{texts}, for
    L{SamplingParams.keep_special}: each text that tokenizes (special
    tokens parsed) to exactly one token that C{engine} hides. Other texts
    are ignored: a parser's markup that this model writes as plain text
    reaches the output anyway, and one it does not have cannot appear
    (llama-server's C{preserved_tokens} rule). Any thread, after
    L{Engine.prepare}.
    """
    if not isinstance(engine, HasSpecialTokens):
        return frozenset()
    ids: set[int] = set()
    for text in texts:
        tokens = engine.tokenize(text, add_bos=False) if text else []
        if len(tokens) == 1 and engine.is_special(tokens[0]):
            ids.add(tokens[0])
    return frozenset(ids)


def generate(
    engine: Engine,
    prompt: Sequence[int],
    params: SamplingParams,
    abort: AbortFlag | None = None,
) -> Generator[EngineEvent, None, FinishReason]:
    """
    Run one request alone on C{engine}, as a generator of its
    L{PrefillProgress} and L{Token} events returning the finish reason.
    Closing the generator early releases the sequence (its output's cells
    freed); L{Aborted} propagates. Model thread only, with no other
    sequence open (they would be stepped too).
    """
    seq = engine.open(prompt, params)
    finished = False
    try:
        while True:
            result = engine.step(abort)
            for s, event in result.events:
                if s != seq:
                    continue
                if isinstance(event, Finished):
                    finished = True
                    return event.reason
                if isinstance(event, Failed):
                    raise event.error
                yield event
    finally:
        engine.release(seq, keep_output=finished)
