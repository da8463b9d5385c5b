"""
Which sequence of the context a new request gets, and what it may reuse.

A context holds L{SlotTable.n} sequences ("slots"). A slot is busy while
its request runs; when the request ends its cells stay (a retained slot),
so the next turn of that conversation, which resends the whole history,
continues from them. This table is the engines' shared bookkeeping of
which tokens each slot holds; the engine applies its decisions to its
cells (L{ds4tw._engine.sequences.SequenceEngine}; in L{ds4tw._engine.llama}, dropping a
tail is C{llama_memory_seq_rm} and a copy between slots loads the source's
per-sequence state, since separate KV streams cannot share cells).

A new prompt (L{SlotTable.claim}) reuses the longest common token prefix
found in any slot, busy ones included: the engine copies that prefix's
cells into the new sequence (a memcpy, where computing them again costs
seconds), so parallel subagents that share a long system prompt and tool
list compute it once. The slot it runs in is the matching slot when that
one is free and the match is most of what it holds (the conversation's
next turn), else an empty slot or the free slot used least recently,
whose old contents are dropped: least-recently-used eviction, so a new
conversation that only shares the chat template's header never
overwrites a retained one while an older or empty slot is there.

Covered by tests/unit/test_slots.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Slot:
    id: int
    #: The tokens whose cells this sequence holds, in position order.
    tokens: list[int] = field(default_factory=list)
    busy: bool = False
    #: When it was last claimed or released (a counter, for LRU).
    used: int = 0


@dataclass(frozen=True)
class Claim:
    """What L{SlotTable.claim} decided for a new prompt."""

    #: The slot the new sequence runs in.
    slot: int
    #: Prompt tokens already in the cache (never the whole prompt: the
    #: last token is always computed again, for fresh logits).
    cached: int
    #: Where the cached prefix comes from: C{slot} itself, another slot
    #: (copy its first C{cached} cells), or None when nothing is reused.
    source: int | None
    #: Tokens the slot held before that are now dropped (from C{cached} on).
    evicted: int
    #: Everything the slot held before, when some of it is dropped (the
    #: prompt cache saves it first; L{ds4tw._engine.kvcache}).
    previous: tuple[int, ...] = field(default=(), compare=False)


#: Continue in a free slot whose tokens match the new prompt only when the
#: match covers at least this share of them (llama-server's
#: C{--slot-prompt-similarity} default is 0.5 too): less is a different
#: conversation sharing a template header, not this one's next turn.
KEEP_SHARE = 0.5


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotTable:
    def __init__(self, n: int, *, reuse: bool = True) -> None:
        if n < 1:
            raise ValueError("a context needs at least one slot")
        self.n = n
        #: False: nothing is ever reused (every prompt prefilled whole).
        self.reuse = reuse
        self.slots = [Slot(i) for i in range(n)]
        self._clock = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    @property
    def busy(self) -> int:
        return sum(s.busy for s in self.slots)

    def free(self) -> list[Slot]:
        return [s for s in self.slots if not s.busy]

    def claim(self, prompt: Sequence[int]) -> Claim:
        """
        Pick a free slot for C{prompt} and mark it busy (raises
        L{RuntimeError} if none is free: the worker admits at most L{n}).
        The slot's C{tokens} become the reused prefix; the engine extends
        them as it computes.
        """
        free = self.free()
        if not free:
            raise RuntimeError("every slot is busy")
        limit = len(prompt) - 1
        best: Slot | None = None
        best_len = 0
        if self.reuse:
            for s in self.slots:
                m = common_prefix(s.tokens, prompt, limit)
                # Ties go to a free slot (no copy), then to the fresher one.
                key = (m, not s.busy, s.used)
                if m > 0 and (best is None or key > (best_len, not best.busy, best.used)):
                    best, best_len = s, m
        if best is not None and not best.busy and best_len >= KEEP_SHARE * len(best.tokens):
            # The same conversation (or most of it): continue in its slot.
            target = best
        else:
            # A new conversation that only shares a header (the chat
            # template's opening, a system prompt) with a retained one
            # must not overwrite it: it takes an empty slot, else the one
            # used least recently, and gets the shared prefix copied in.
            target = min(free, key=lambda s: (bool(s.tokens), s.used))
        source = None if best is None else best.id
        cached = best_len
        evicted = len(target.tokens) - cached if target is best else len(target.tokens)
        previous = tuple(target.tokens) if evicted else ()
        target.tokens = list(prompt[:cached])
        target.busy = True
        target.used = self._tick()
        return Claim(target.id, cached, source, evicted, previous)

    def release(self, slot: int, keep: int | None = None) -> int:
        """
        The request in C{slot} ended. Keep its first C{keep} tokens (all
        when None) as a retained prefix; return how many were dropped.
        """
        s = self.slots[slot]
        s.busy = False
        s.used = self._tick()
        dropped = 0
        if keep is not None and keep < len(s.tokens):
            dropped = len(s.tokens) - keep
            del s.tokens[keep:]
        if not self.reuse:
            dropped += len(s.tokens)
            s.tokens.clear()
        return dropped
