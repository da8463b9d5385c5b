"""
The sequence bookkeeping both engines share: L{SequenceEngine}, the base
of L{ds4tw.LlamaEngine} and of the scripted engine.

A context holds C{slots} sequences. Opening one claims a slot
(L{ds4tw._engine.slots.SlotTable}) and settles where its prompt's prefix comes
from (L{ds4tw._engine.kvcache.Prefixes}): the slot's own cells, another slot's
(copied), the prompt cache (restored at the start of a later step, once
its state is read), or nowhere. Releasing one keeps its prompt's cells
(and its output's, for a finished answer) as a retained prefix. A step
first runs the restores whose state is loaded, then shares the step's
budget among the decoding sequences and the prompt chunks
(L{ds4tw._engine.prefill.PrefillOrder}).

What is each engine's own stays there: what a slot's cells are and how
they are copied, trimmed and saved (llama.cpp's KV streams; the scripted
engine's lists of tokens), how a token is chosen, what a step costs.
Each extends L{Seq} with its own per-sequence state.

Covered by tests/unit/test_scripted_cli.py, tests/unit/test_kvcache.py,
tests/unit/test_scheduler.py and tests/unit/test_engine_lifecycle.py
(through the scripted engine) and tests/integration/test_llama_engine.py,
tests/integration/test_batching.py, tests/integration/test_prompt_cache.py
and tests/integration/test_engine_lifecycle.py (the real one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .interface import (
    Aborted,
    AbortFlag,
    ChatPrompt,
    EngineEvent,
    FinishReason,
    LoadProgress,
    MemoryUse,
    PrefillProgress,
    SamplingParams,
    StepEvent,
    StepResult,
    generate,
)
from .kvcache import CacheStats, Prefixes, PromptCache, Restore, template_opening
from .kvcache._cache import State
from .prefill import PrefillOrder
from .slots import Claim, SlotTable
from .template import ChatTemplate

#: Aging off: no prompt is passed over this many steps.
_NEVER = 10**9


@dataclass(kw_only=True)
class Seq:
    """One open sequence: what both engines keep of it."""

    prompt: list[int]
    params: SamplingParams
    #: Its slot, which is its id (set by L{SequenceEngine.open}).
    id: int = -1
    #: Prompt tokens reused rather than computed, and where from
    #: (L{PrefillProgress.source}).
    cached: int = 0
    source: str | None = None
    #: A prefix state to load before prefilling (the prompt cache).
    restore: Restore | None = None
    #: Tokens of this sequence in its cells (the next position).
    n_past: int = 0
    #: Tokens to emit next in place of sampling (L{SequenceEngine.force}).
    forced: deque[int] = field(default_factory=deque)
    #: Tokens emitted so far (forced ones included).
    emitted: int = 0
    finished: bool = False

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)

    def progress(self) -> PrefillProgress:
        return PrefillProgress(self.n_past, len(self.prompt), self.cached, self.source)


S = TypeVar("S", bound=Seq)


def await_restores(restores: Sequence[Restore], abort: AbortFlag | None) -> None:
    """
    Nothing else can run this step: wait up to ~50 ms for one of the
    disk reads, watching the abort flag (L{Aborted}: nothing changed).
    """
    for _ in range(10):
        if abort is not None and abort.is_set:
            raise Aborted
        if any(r.wait(0.005 / len(restores)) for r in restores):
            return


class SequenceEngine(ABC, Generic[S]):
    """
    The part of an L{ds4tw.Engine} that keeps its sequences: L{open},
    L{release}, L{force}, the restores and the prefill budget at the start
    of a step. A subclass makes its L{Seq} records (L{_new_seq}), applies
    the slot decisions to its cells (L{_copy_prefix}, L{_trim},
    L{_clear}; L{state} and L{restore} for the prompt cache) and runs the
    steps.

    @param n_batch: the step budget in tokens (one per decoding sequence,
        the rest for prompt chunks).
    @param n_batch_decoding: the step budget while some sequence is
        decoding (at most C{n_batch}; default C{n_batch}).
    @param reuse: reuse the longest prefix a slot holds.
    """

    #: The name clients use for the model (L{ds4tw.Engine.model_id}).
    model_id: str
    #: Saved prefixes beyond the slots, in memory and on disk (None: none).
    prompt_cache: PromptCache | None

    def __init__(
        self,
        *,
        n_ctx: int,
        n_batch: int,
        n_batch_decoding: int | None,
        slots: int,
        prompt_cache: PromptCache | None,
        reuse: bool = True,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_batch_decoding = min(n_batch, n_batch_decoding or n_batch)
        self._table = SlotTable(slots, reuse=reuse)
        self.prompt_cache = prompt_cache
        self._prefixes = Prefixes(self._table, prompt_cache)
        self._seqs: dict[int, S] = {}
        self._prefill_order = PrefillOrder()

    @property
    def prefill_aging(self) -> int | None:
        """
        Steps in a row a prefilling prompt may get less than its fair
        share before it goes first (L{ds4tw._engine.prefill.PrefillOrder}); None
        when aging is off, which only a benchmark wants (it measures what
        aging buys). Settable on a loaded engine, between steps.
        """
        steps = self._prefill_order.aging_steps
        return None if steps >= _NEVER else steps

    @prefill_aging.setter
    def prefill_aging(self, steps: int | None) -> None:
        self._prefill_order = PrefillOrder(_NEVER if steps is None else steps)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def slots(self) -> int:
        return self._table.n

    @property
    def cache_stats(self) -> CacheStats:
        """Prefix reuse counters (hits by source, restores, saves, ...)."""
        return self._prefixes.stats

    # -- what each engine does its own way ---------------------------------

    @property
    @abstractmethod
    def chat_template(self) -> str: ...

    @property
    @abstractmethod
    def n_vocab(self) -> int: ...

    @abstractmethod
    def prepare(self) -> None: ...

    @abstractmethod
    def load(self, progress: LoadProgress | None = None) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def memory(self) -> MemoryUse: ...

    @abstractmethod
    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], **template_kwargs: Any
    ) -> ChatPrompt: ...

    @abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]: ...

    @abstractmethod
    def step(self, abort: AbortFlag | None = None) -> StepResult: ...

    @abstractmethod
    def state(self, slot: int) -> State:
        """C{slot}'s cells, whole (L{ds4tw._engine.kvcache.States})."""

    @abstractmethod
    def restore(self, slot: int, data: State, keep: int) -> bool:
        """Load C{data} into C{slot}, keeping its first C{keep} cells."""

    @abstractmethod
    def _new_seq(self, prompt: list[int], params: SamplingParams) -> S:
        """
        The record of a sequence about to open; raises, before anything is
        allocated, if C{params} cannot be served.
        """

    @abstractmethod
    def _copy_prefix(self, slot: int, source: int, cached: int, restore: Restore | None) -> bool:
        """
        Make C{slot}'s cells the first C{cached} of C{source}'s; False when
        that is not worth it (the prompt cache's C{restore} has more) or
        failed.
        """

    @abstractmethod
    def _trim(self, slot: int, keep: int) -> bool:
        """Drop C{slot}'s cells from C{keep} on; False if they cannot be."""

    @abstractmethod
    def _clear(self, slot: int) -> None:
        """Drop all of C{slot}'s cells."""

    def _end(self, s: S) -> None:
        """C{s} is released: free what it holds beyond its cells."""

    def _restored(self, s: S, restore: Restore) -> None:
        """C{s}'s prefix is settled by C{restore} (loaded or not)."""

    # -- sequences ---------------------------------------------------------

    def open(self, prompt: Sequence[int], params: SamplingParams) -> int:
        s = self._new_seq(list(prompt), params)
        opened = self._prefixes.open(s.prompt, self)
        claim = opened.claim
        s.id, s.restore = claim.slot, opened.restore
        s.cached, s.source = self._claim_cells(claim, opened.restore)
        s.n_past = s.cached
        self._prefill_order.forget(claim.slot)
        self._seqs[claim.slot] = s
        if opened.restore is None:
            self._prefixes.count(s.source, s.cached)
        return claim.slot

    def _claim_cells(self, claim: Claim, restore: Restore | None) -> tuple[int, str | None]:
        """Apply C{claim} to the slot's cells: the prefix it really has, and from where."""
        slot, cached = claim.slot, claim.cached
        if claim.source is not None and claim.source != slot:
            # The prefix lives in another sequence (a parallel subagent with
            # the same system prompt and tools): copy its cells over.
            if self._copy_prefix(slot, claim.source, cached, restore):
                return cached, "copy"
        elif self._trim(slot, cached):
            return cached, "slot" if cached else None
        # A cache that cannot drop a tail (recurrent, SWA), or a copy not
        # made: start over.
        self._clear(slot)
        self._table.slots[slot].tokens.clear()
        return 0, None

    def release(self, seq: int, *, keep_output: bool = True) -> None:
        s = self._seqs.pop(seq)
        if s.restore is not None:
            s.restore.cancel()  # a disk read in flight stops within a chunk
        self._end(s)
        self._table.release(seq, None if keep_output else min(s.n_past, len(s.prompt)))
        kept = len(self._table.slots[seq].tokens)
        if not self._trim(seq, kept):
            self._clear(seq)
            self._table.slots[seq].tokens.clear()

    def force(self, seq: int, tokens: Sequence[int]) -> None:
        self._seqs[seq].forced.extend(tokens)

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, abort: AbortFlag | None = None
    ) -> Generator[EngineEvent, None, FinishReason]:
        """One request alone (L{ds4tw._engine.interface.generate})."""
        return generate(self, prompt, params, abort)

    # -- load and close ----------------------------------------------------

    def _start_cache(self, template: ChatTemplate, identity: Callable[[], dict[str, Any]]) -> None:
        """Loaded: measure the template's opening, start the prompt cache (if any)."""
        self._prefixes.opening = template_opening(template, self.tokenize)
        if self.prompt_cache is not None:
            self.prompt_cache.start(identity(), self._n_ctx)

    def _close_sequences(self, *, save: bool) -> None:
        """
        Release every sequence; with C{save}, the slots' prefixes go to the
        prompt cache (its disk tier; its memory tier is emptied). Then the
        slots hold nothing: the cells are about to go with the context,
        and a reload starts from empty slots (the prompt cache's disk tier
        is what carries prefixes over an unload).
        """
        for seq in list(self._seqs):
            self.release(seq, keep_output=False)
        if save:
            self._prefixes.close(self)
        for slot in self._table.slots:
            slot.tokens.clear()
        self._prefill_order = PrefillOrder(self._prefill_order.aging_steps)

    # -- the start of a step -----------------------------------------------

    def _live(self) -> list[S]:
        """The open sequences not finished, in the order they are stepped."""
        return [s for s in self._seqs.values() if not s.finished]

    def _begin_step(
        self, abort: AbortFlag | None
    ) -> tuple[list[S], list[S], list[tuple[int, StepEvent]]]:
        """
        Run the restores whose state is loaded (in the step, so that the
        cancel flag and the keepalive see them like a prefill batch).
        Returns the sequences to step, those whose state is still being
        read (they sit this step out), and the restores' events.
        """
        live = self._live()
        events: list[tuple[int, StepEvent]] = []
        waiting: list[S] = []
        if any(s.restore is not None for s in live):
            if abort is not None and abort.is_set:
                raise Aborted
            for s in live:
                r = s.restore
                if r is None:
                    continue
                if not r.done():
                    waiting.append(s)
                    continue
                s.restore = None
                s.cached, s.source = self._prefixes.settle(
                    s.id, s.prompt, r, self, s.cached, s.source
                )
                s.n_past = s.cached
                self._restored(s, r)
                events.append((s.id, s.progress()))
            live = [s for s in live if s not in waiting]
        return live, waiting, events

    def _plan_prefill(
        self, live: Iterable[S], decoding: int, room: int | None = None
    ) -> list[tuple[S, int]]:
        """
        This step's prompt chunks: C{(sequence, tokens)} in batch order,
        beside C{decoding} decode tokens, within the step budget (a smaller
        one while some sequence decodes bounds its stall) and C{room}.
        """
        filling = {s.id: s for s in live if s.prefilling}
        limit = self.n_batch_decoding if decoding else self.n_batch
        budget = max(limit - decoding, 1)
        if room is not None:
            budget = min(room, budget)
        remaining = {i: len(s.prompt) - s.n_past for i, s in filling.items()}
        return [(filling[i], n) for i, n in self._prefill_order.plan(remaining, budget)]

    def _idle(
        self, waiting: Sequence[S], events: list[tuple[int, StepEvent]], abort: AbortFlag | None
    ) -> StepResult:
        """A step with nothing to compute: wait a little for a disk read, if that is all."""
        if waiting and not events:
            await_restores([s.restore for s in waiting if s.restore is not None], abort)
        return StepResult(tuple(events))

    def _prompt_done(self, s: S) -> None:
        """C{s} just finished prefilling: the prompt cache may save it."""
        self._prefixes.computed(s.id, s.prompt, len(s.prompt) - s.cached, self)
