"""
A scripted L{Engine}: replies and prefill batches under the caller's
control, no model needed. Public as L{ds4tw.testing.ScriptedEngine}.

Tokenization is one token per character, so prompt lengths are easy to
reason about in tests; the chat template is ChatML unless another Jinja
template is given, and it is rendered exactly as the real engine renders
its own (L{ds4tw._engine.template.ChatTemplate}). With C{logprobs} asked for,
every token reports a log probability of L{TOKEN_LOGPROB} and
alternatives below it.

It runs C{slots} sequences at once (one by default) in steps shaped like
L{ds4tw.LlamaEngine}'s: each step emits a token for every decoding
sequence and prefills prompt chunks within a budget of C{n_batch}
tokens (L{ds4tw._engine.prefill}: shortest remaining first, with aging); the
step that completes a prompt also emits its first token. L{steps}
records every step's units by slot.

With C{prefix_cache=True}, like L{ds4tw.LlamaEngine}'s retained slots,
the engine remembers what each slot holds (L{ds4tw._engine.slots.SlotTable}): a
prompt sharing a prefix with any of them reports that prefix as
C{PrefillProgress.cached} (at most all but one token) and prefills only
the rest. Off by default, so that every prompt is prefilled whole.

By default every step is instant. With C{tps} (decode tokens per second)
or C{prefill_tps} (prompt tokens per second) each step takes that much
real time in the model thread, checking the abort flag every millisecond
as llama.cpp checks it between graph nodes, so queueing, keepalives and
cancels behave as beside a model (C{twistd ds4tw --model scripted:...},
the benchmark's scripted server).

L{ScriptedEngine.force}d tokens are emitted in place of the reply (each
character is a token, so a forced token is its own text) and recorded in
L{ScriptedEngine.forced}; the reply then goes on after its own first
occurrence of the forced text, as a model made to close its reasoning
early would answer from there.

Every unit of work the engine "computes" is appended to L{computed}, so a
test can assert exactly how much work ran before a cancel took effect.
The job's L{AbortFlag} is checked at the start of every step (a step
found aborted is not computed and raises L{Aborted}), and L{step_hook},
when set, is called there first, so a test can set the flag "in the
middle" of a step, as the reactor does beside a real engine.

Its life is the real engine's: L{ScriptedEngine.prepare} (nothing to
read: the prompt side always works), L{ScriptedEngine.load} reporting
C{load_steps} progress steps to its callback (so a test can stop a load
half way: L{LoadAborted}), L{ScriptedEngine.close} dropping what the
slots held (their prefixes go to the prompt cache's disk tier, as a real
unload's do), and a later load bringing it back. L{ScriptedEngine.memory}
reports C{memory_mb} as the model's weights, so a memory budget can be
tested without a model.

Covered by tests/unit/test_exports.py (the Engine protocol),
tests/unit/test_reasoning_budget.py (forced tokens) and
tests/unit/test_engine_lifecycle.py (load, abort, unload, reload,
memory), and used by most unit tests (tests/unit/conftest.py).
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .interface import (
    Aborted,
    AbortFlag,
    ChatPrompt,
    Finished,
    LoadAborted,
    LoadProgress,
    MemoryUse,
    SamplingParams,
    StepEvent,
    StepResult,
    Token,
)
from .kvcache import PromptCache, Restore
from .sequences import Seq, SequenceEngine
from .template import CHATML_TEMPLATE, ChatTemplate

#: A scripted slot's "state" is its tokens as 32-bit integers.
STATE_BYTES_PER_TOKEN = 4

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


@dataclass(kw_only=True)
class _Seq(Seq):
    """One open sequence of the scripted engine: its reply, and where it is."""

    reply: Reply
    #: The next piece of the reply to emit.
    pos: int = 0
    #: The text forced so far, not yet matched in the reply.
    forced_text: bytes = b""


class ScriptedEngine(SequenceEngine[_Seq]):
    """
    An L{Engine} that plays back L{Reply}s in order (the last one repeats),
    one per opened sequence; or, for a prompt that contains the text of
    one of C{when}'s pairs, that pair's reply.

    @param n_batch: the step budget: tokens per step, one for each
        decoding sequence and the rest for prompt chunks.
    @param tps: decode speed in steps per second (0: instant); a step
        decodes every decoding sequence at once.
    @param prefill_tps: prefill speed in prompt tokens per second (0: instant).
    @param prefix_cache: reuse the longest prefix a slot holds.
    @param slots: sequences at once.
    @param n_batch_decoding: the step budget while some sequence decodes
        (default: C{n_batch}).
    @param prompt_cache: a L{ds4tw._engine.kvcache.PromptCache} (needs
        C{prefix_cache}); a slot's "state" is its tokens, packed.
    @param when: (text, reply) pairs: a prompt containing C{text} is
        answered with C{reply} (the first pair that matches), without
        taking a turn from C{replies}. Clients that send requests of their
        own beside the conversation (a title, a summary), sometimes at
        once, get the reply meant for each, in any order; and a reply can
        answer what a tool returned.
    @param load_steps: progress reports of a L{load} (C{i / load_steps}
        for i from 1), each a chance for its callback to stop the load.
    @param load_seconds: how long a L{load} takes, in real time, shared
        out before each of its steps (ten when C{load_steps} is 0), so a
        server's "loading" stage can be watched (C{--model
        scripted:load_seconds=...}).
    @param memory_mb: what L{memory} reports the model's weights take
        (MiB), loaded or not.
    """

    #: A paced step checks the abort flag this often (seconds).
    ABORT_SLICE_S = 0.001

    def __init__(
        self,
        replies: Iterable[Reply | str] = ("Hello from the scripted engine.",),
        *,
        n_ctx: int = 4096,
        n_batch: int = 64,
        model_id: str = "scripted",
        chat_template: str = CHATML_TEMPLATE,
        tps: float = 0.0,
        prefill_tps: float = 0.0,
        prefix_cache: bool = False,
        slots: int = 1,
        n_batch_decoding: int | None = None,
        prompt_cache: PromptCache | None = None,
        when: Iterable[tuple[str, Reply | str]] = (),
        load_steps: int = 0,
        memory_mb: float = 0.0,
        load_seconds: float = 0.0,
    ) -> None:
        if tps < 0 or prefill_tps < 0:
            raise ValueError("tps and prefill_tps must be >= 0")
        if load_steps < 0 or memory_mb < 0 or load_seconds < 0:
            raise ValueError("load_steps, load_seconds and memory_mb must be >= 0")
        super().__init__(
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_batch_decoding=n_batch_decoding,
            slots=slots,
            prompt_cache=prompt_cache,
            reuse=prefix_cache,
        )
        self.model_id = model_id
        self.tps = tps
        self.prefill_tps = prefill_tps
        #: What each slot's "KV cache" holds (L{ds4tw._engine.slots.SlotTable}).
        self.table = self._table
        #: Every restore run: (slot, tier, tokens kept).
        self.restores: list[tuple[int, str, int]] = []
        #: What each slot's "KV cells" hold, kept apart from the table (as
        #: llama.cpp's cells are), so that a saved "state" is what the
        #: cells held and a restore must bring back exactly the prompt's.
        self._cells: list[list[int]] = [[] for _ in range(slots)]
        self._replies: deque[Reply] = deque(
            r if isinstance(r, Reply) else Reply.words(r) for r in replies
        )
        self._when = [(t, r if isinstance(r, Reply) else Reply.words(r)) for t, r in when]
        self._template = ChatTemplate(chat_template, eos_token="<|im_end|>")
        self.load_steps = load_steps or (10 if load_seconds else 0)
        self.load_seconds = load_seconds
        self.memory_mb = memory_mb
        #: L{prepare} ran (the scripted prompt side works without it).
        self.prepared = False
        #: Loaded now: set by a L{load} that finished, cleared by L{close}.
        self.loaded = False
        #: Closed since the last load.
        self.closed = False
        #: Loads that finished, loads stopped by their progress callback
        #: (L{LoadAborted}), and closes of a loaded engine.
        self.loads = 0
        self.aborted_loads = 0
        self.unloads = 0
        #: Every progress fraction reported, over all loads.
        self.load_progress: list[float] = []
        #: Work done, in order: ("prefill", tokens_done), ("token", index),
        #: ("restore", tokens_cached) when a prompt-cache restore settled,
        #: ("closed", None) when a sequence is released unfinished.
        self.computed: list[tuple[str, int | None]] = []
        #: Every computed step: the (slot, kind, n) units it held.
        self.steps: list[tuple[tuple[int, str, int], ...]] = []
        #: Called with each unit about to be computed (C{("prefill", done)}
        #: or C{("token", index)}) before the step's abort check.
        self.step_hook: Callable[[tuple[str, int]], None] | None = None
        #: Every token written in the model's place (L{force}): (slot, token).
        self.forced: list[tuple[int, int]] = []
        #: Prompts and params of every open() call.
        self.calls: list[tuple[list[int], SamplingParams]] = []
        #: Keyword arguments of every apply_chat_template() call.
        self.template_kwargs: list[dict[str, Any]] = []
        #: Messages of every apply_chat_template() call.
        self.template_messages: list[list[dict[str, Any]]] = []
        #: Appended to every rendered chat prompt (e.g. "<think>\n", as
        #: templates that force thinking on do).
        self.generation_prompt_suffix = ""

    @property
    def chat_template(self) -> str:
        return self._template.source

    @property
    def n_vocab(self) -> int:
        # Tokens are characters (tokenize): any code point is an id.
        return 0x110000

    @property
    def prefix_cache(self) -> bool:
        """Reuse the longest prefix a slot holds (settable at any time)."""
        return self.table.reuse

    @prefix_cache.setter
    def prefix_cache(self, on: bool) -> None:
        self.table.reuse = on

    @property
    def held(self) -> list[int]:
        """The tokens of the slot used last (a one-slot engine's cache)."""
        return max(self.table.slots, key=lambda s: s.used).tokens

    def add_reply(self, reply: Reply | str) -> None:
        self._replies.append(reply if isinstance(reply, Reply) else Reply.words(reply))

    def prepare(self) -> None:
        self.prepared = True

    def load(self, progress: LoadProgress | None = None) -> None:
        self.prepare()
        for i in range(1, self.load_steps + 1):
            if self.load_seconds:
                time.sleep(self.load_seconds / self.load_steps)
            self.load_progress.append(i / self.load_steps)
            if progress is not None and not progress(i / self.load_steps):
                self.aborted_loads += 1
                raise LoadAborted(f"{self.model_id}: load stopped at step {i}/{self.load_steps}")
        self.loaded = True
        self.closed = False
        self.loads += 1
        self._start_cache(
            self._template,
            lambda: {"model": "scripted", "kv_bytes_per_token": STATE_BYTES_PER_TOKEN},
        )

    def close(self) -> None:
        self._close_sequences(save=True)
        # The "context" goes: what the cells held is gone, as a real
        # unload's KV cache is.
        self._cells = [[] for _ in range(self.slots)]
        if self.loaded:
            self.unloads += 1
        self.loaded = False
        self.closed = True

    def memory(self) -> MemoryUse:
        cache = self.prompt_cache
        return MemoryUse(
            weights=int(self.memory_mb * 2**20),
            kv=0,
            compute=0,
            cache=cache.ram.budget if cache is not None else 0,
            measured=self.loaded,
        )

    # -- per-sequence state (L{ds4tw._engine.kvcache.States}) -------------------

    def state(self, slot: int) -> bytes:
        cells = self._cells[slot]
        return struct.pack(f"<{len(cells)}I", *cells)

    def restore(self, slot: int, data: bytes | bytearray | memoryview, keep: int) -> bool:
        n, odd = divmod(len(data), STATE_BYTES_PER_TOKEN)
        if odd or n < keep:
            self._cells[slot] = []
            return False
        self._cells[slot] = list(struct.unpack(f"<{n}I", data))[:keep]
        return True

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], **template_kwargs: Any
    ) -> ChatPrompt:
        self.template_kwargs.append(dict(template_kwargs))
        self.template_messages.append([dict(m) for m in messages])
        chat = self._template.render(messages, **template_kwargs)
        return ChatPrompt(chat.text + self.generation_prompt_suffix, chat.stop)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return ([1] if add_bos else []) + [ord(c) for c in text]

    def _next_reply(self, prompt: Sequence[int]) -> Reply:
        if self._when:
            # Tokens are characters (tokenize), so the prompt's text is theirs.
            text = "".join(map(chr, prompt))
            for needle, reply in self._when:
                if needle in text:
                    return reply
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

    # -- sequences (L{ds4tw._engine.sequences.SequenceEngine}) -------------------

    def _new_seq(self, prompt: list[int], params: SamplingParams) -> _Seq:
        self.calls.append((list(prompt), params))
        return _Seq(prompt=prompt, params=params, reply=self._next_reply(prompt))

    def _copy_prefix(self, slot: int, source: int, cached: int, restore: Restore | None) -> bool:
        self._cells[slot] = self._cells[source][:cached]
        return True

    def _trim(self, slot: int, keep: int) -> bool:
        del self._cells[slot][keep:]
        return True

    def _clear(self, slot: int) -> None:
        self._cells[slot] = []

    def _end(self, s: _Seq) -> None:
        if not s.finished:
            self.computed.append(("closed", None))

    def _restored(self, s: _Seq, restore: Restore) -> None:
        if self._cells[s.id] != self.table.slots[s.id].tokens:
            raise AssertionError(f"slot {s.id}: the restored state is not the prompt's prefix")
        if s.source == restore.tier:
            self.restores.append((s.id, restore.tier, s.cached))
        self.computed.append(("restore", s.cached))

    def _piece(self, s: _Seq) -> bytes | None:
        """The next piece of C{s}'s reply, None at its end-of-generation."""
        if s.forced:
            return self._forced_piece(s.forced[0])
        if s.pos < len(s.reply.pieces):
            return s.reply.pieces[s.pos]
        if s.reply.eos and not s.params.ignore_eos:
            return None
        return s.reply.filler

    @staticmethod
    def _forced_piece(token: int) -> bytes:
        # Tokens are characters (tokenize), so a forced token is its own text.
        return chr(token).encode("utf-8", "surrogatepass") if token < 0x110000 else b""

    def force(self, seq: int, tokens: Sequence[int]) -> None:
        """
        Emit C{tokens} next, one per step, in place of the reply. Once they
        are all out, the reply skips past its own first occurrence of
        their text if it has one (the script's model, made to close its
        reasoning early, goes on as it would have after closing it), and
        otherwise goes on where it was. L{forced} records each one.
        """
        super().force(seq, tokens)

    @staticmethod
    def _skip_to_after(s: _Seq, text: bytes) -> None:
        """Move C{s}'s reply to just after the first C{text} from here on."""
        pieces = s.reply.pieces[s.pos :]
        at = b"".join(pieces).find(text) if text else -1
        if at < 0:
            return
        end, seen = at + len(text), 0
        for i, piece in enumerate(pieces):
            seen += len(piece)
            if seen >= end:
                rest = piece[len(piece) - (seen - end) :]
                # What follows the text in its piece stays, as a piece of its own.
                s.reply = Reply(
                    s.reply.pieces[: s.pos + i + 1] + ((rest,) if rest else ()) + pieces[i + 1 :],
                    s.reply.eos,
                    s.reply.filler,
                )
                s.pos += i + 1
                return

    def _plan(self, live: list[_Seq]) -> list[tuple[int, str, int]]:
        """This step's units: a token per decoding sequence, then prompt chunks."""
        units = [(s.id, "token", s.emitted) for s in live if not s.prefilling]
        for s, n in self._plan_prefill(live, len(units)):
            units.append((s.id, "prefill", s.n_past + n))
        return units

    def _pace(self, seconds: float, abort: AbortFlag | None) -> None:
        end = time.perf_counter() + seconds
        while (left := end - time.perf_counter()) > 0:
            if abort is not None and abort.is_set:
                raise Aborted
            time.sleep(min(left, self.ABORT_SLICE_S))

    def step(self, abort: AbortFlag | None = None) -> StepResult:
        live, waiting, events = self._begin_step(abort)
        units = self._plan(live)
        if not units:
            return self._idle(waiting, events, abort)
        # What ends now needs no compute: a reply at its end-of-generation.
        ended: list[int] = []
        work: list[tuple[int, str, int]] = []
        for unit in units:
            i, kind, _ = unit
            if kind == "token" and self._piece(self._seqs[i]) is None:
                ended.append(i)
            else:
                work.append(unit)
        for _, kind, n in work:
            if self.step_hook is not None:
                self.step_hook((kind, n))
        if abort is not None and abort.is_set:
            raise Aborted
        prefilled = 0
        for i, kind, n in work:
            if kind == "prefill":
                prefilled += n - self._seqs[i].n_past
        decoding = sum(1 for _, kind, _ in work if kind == "token")
        seconds = prefilled / self.prefill_tps if self.prefill_tps else 0.0
        if decoding and self.tps:
            seconds += 1.0 / self.tps
        if seconds > 0:
            self._pace(seconds, abort)
        # The step happened: nothing above changed any sequence.
        for i in ended:
            self._seqs[i].finished = True
            events.append((i, Finished("stop")))
        for i, kind, n in work:
            s = self._seqs[i]
            if kind == "prefill":
                self.computed.append(("prefill", n))
                self.table.slots[i].tokens[s.n_past :] = s.prompt[s.n_past : n]
                self._cells[i][s.n_past :] = s.prompt[s.n_past : n]
                s.n_past = n
                events.append((i, s.progress()))
                if s.prefilling:
                    continue
                self._prompt_done(s)
            events.extend((i, e) for e in self._emit(i, s))
        self.steps.append(tuple(work))
        return StepResult(
            tuple(events),
            tuple(dict.fromkeys(i for i, _, _ in work)),
            decoding,
            prefilled,
        )

    def _emit(self, i: int, s: _Seq) -> list[StepEvent]:
        """Sample C{s}'s next token (its logits are fresh after this step)."""
        piece = self._piece(s)
        if piece is None:
            s.finished = True
            return [Finished("stop")]
        index = s.emitted
        self.computed.append(("token", index))
        s.emitted += 1
        if s.forced:
            token = s.forced.popleft()
            self.forced.append((i, token))
            s.forced_text += piece
            if not s.forced:
                self._skip_to_after(s, s.forced_text)
                s.forced_text = b""
        else:
            token = 1000 + index
            s.pos += 1
        # The token's cell, as the real engine has it after the next step.
        self.table.slots[i].tokens.append(token)
        self._cells[i].append(token)
        s.n_past += 1
        out: list[StepEvent] = [self._token(token, piece, s.params.logprobs)]
        if s.emitted >= s.params.max_tokens or len(s.prompt) + s.emitted >= self._n_ctx:
            s.finished = True
            out.append(Finished("length"))
        return out


# -- twistd ds4tw --model scripted:SPEC -----------------------------------

#: What C{--model scripted:SPEC} means, for the option's help and errors.
SPEC_HELP = (
    "scripted:KEY=VALUE,... (or ;-separated) with keys tps (decode tokens/s, 0: instant), "
    "prefill_tps (prompt tokens/s, 0: instant), think (reasoning tokens before the answer), "
    "eos (1: the reply ends; 0: it pads to max_tokens), load_seconds (how long a load takes), "
    "memory_mb (what the model says it takes) and reply (the answer text; last, it "
    "takes the rest of the spec verbatim, commas included); or scripted:FILE.json, an object "
    'with the same keys ("reply" may be a list of replies played in turn) and "when", an '
    "object mapping a text to the reply for any prompt that contains it"
)


@dataclass(frozen=True)
class ScriptedSpec:
    """The scripted engine C{twistd ds4tw --model scripted:SPEC} serves."""

    replies: tuple[str, ...] = ("Hello from the scripted engine.",)
    tps: float = 0.0
    prefill_tps: float = 0.0
    think: int = 0
    eos: bool = True
    #: (text, reply): the reply for a prompt that contains the text.
    when: tuple[tuple[str, str], ...] = ()
    load_seconds: float = 0.0
    memory_mb: float = 0.0

    def engine(
        self,
        *,
        n_ctx: int = 4096,
        n_batch: int = 64,
        model_id: str | None = None,
        chat_template: str | None = None,
        slots: int = 1,
        n_batch_decoding: int | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> ScriptedEngine:
        """A paced engine with a prefix cache, as a model would be."""
        thinking = ("<think>", *[" thinking"] * self.think, "</think>\n\n") if self.think else ()

        def reply(text: str) -> Reply:
            return Reply(tuple(p.encode() for p in thinking) + Reply.words(text).pieces, self.eos)

        return ScriptedEngine(
            [reply(r) for r in self.replies],
            n_ctx=n_ctx,
            n_batch=n_batch,
            model_id=model_id or "scripted",
            chat_template=chat_template or CHATML_TEMPLATE,
            tps=self.tps,
            prefill_tps=self.prefill_tps,
            prefix_cache=True,
            slots=slots,
            n_batch_decoding=n_batch_decoding,
            prompt_cache=prompt_cache,
            when=[(text, reply(r)) for text, r in self.when],
            load_seconds=self.load_seconds,
            memory_mb=self.memory_mb,
        )


_SPEC_KEYS = ("reply", "tps", "prefill_tps", "think", "eos", "when", "load_seconds", "memory_mb")


def parse_spec(text: str) -> ScriptedSpec:
    """
    Parse the part of C{--model} after C{scripted:}: C{KEY=VALUE} pairs
    separated by C{,} or C{;} (C{reply=} takes the rest of the text), or,
    without any C{=}, the path of a JSON file with the same keys. Raises
    L{ValueError} naming what is wrong.
    """
    if text and "=" not in text:
        try:
            with open(text, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise ValueError(
                f"cannot read the scripted spec file {text!r} ({e.strerror}); "
                f"a spec without '=' names a JSON file ({SPEC_HELP})"
            ) from e
        except ValueError as e:
            raise ValueError(f"the scripted spec file {text!r} is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"the scripted spec file {text!r} must hold a JSON object")
        return _spec_from(data, f"in {text!r}")
    values: dict[str, Any] = {}
    rest = text
    while rest := rest.lstrip(",;"):
        key, eq, after = rest.partition("=")
        key = key.strip()
        if not eq or not key or re.search(r"[,;]", key):
            bad = re.split(r"[,;]", rest, maxsplit=1)[0]
            raise ValueError(f"scripted spec: expected KEY=VALUE, got {bad!r} ({SPEC_HELP})")
        if key in values:
            raise ValueError(f"scripted spec: {key!r} given twice")
        if key == "reply":
            values[key], rest = after, ""
        else:
            m = re.search(r"[,;]", after)
            values[key], rest = (after[: m.start()], after[m.end() :]) if m else (after, "")
            values[key] = values[key].strip()
    return _spec_from(values, "")


def _spec_from(values: dict[str, Any], where: str) -> ScriptedSpec:
    where = f" {where}" if where else ""
    unknown = sorted(set(values) - set(_SPEC_KEYS))
    if unknown:
        raise ValueError(
            f"scripted spec: unknown key {unknown[0]!r}{where}; known keys: {', '.join(_SPEC_KEYS)}"
        )

    def number(key: str, kind: type[float] | type[int]) -> Any:
        raw = values.get(key, 0)
        try:
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise ValueError
            v = kind(raw)
            if not math.isfinite(v) or v < 0:
                raise ValueError
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(
                f"scripted spec: {key} must be {what} >= 0{where}, got {raw!r}"
            ) from None
        return v

    tps, prefill_tps, think = (
        number("tps", float),
        number("prefill_tps", float),
        number("think", int),
    )
    eos_raw = values.get("eos", True)
    eos = {"1": True, "0": False, True: True, False: False}.get(eos_raw)
    if eos is None:
        raise ValueError(f"scripted spec: eos must be 1 or 0{where}, got {eos_raw!r}")
    reply = values.get("reply", ScriptedSpec.replies)
    replies = (reply,) if isinstance(reply, str) else reply
    if (
        not isinstance(replies, list | tuple)
        or not replies
        or not all(isinstance(r, str) and r.strip() for r in replies)
    ):
        raise ValueError(
            f"scripted spec: reply must be non-empty text (or a list of them in a file){where}"
        )
    when = values.get("when", {})
    if (
        not isinstance(when, dict)
        or not all(isinstance(t, str) and t for t in when)
        or not all(isinstance(r, str) and r.strip() for r in when.values())
    ):
        raise ValueError(
            "scripted spec: when must be an object of texts to non-empty replies "
            f"(in a file){where}"
        )
    return ScriptedSpec(
        tuple(replies),
        tps,
        prefill_tps,
        think,
        eos,
        tuple(when.items()),
        number("load_seconds", float),
        number("memory_mb", float),
    )
