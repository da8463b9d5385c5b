"""
One tier of the prompt cache: saved prefix states under a byte budget.

Lookup (L{PrefixIndex.match}) finds the entry sharing the longest token
prefix with a prompt; a state holding more than the shared part is still
useful (restored whole, its tail dropped).

Eviction is by a score per byte::

    score = (1 + hits) * 0.5 ** (idle / HALF_LIFE)

C{hits} counts the entry's restores, C{idle} is the time since it was
saved or last restored. Bytes are what the budget counts, and a prefix
saves about as much prefill per byte at any length (state size and
prefill time both grow with the tokens), so the score is per byte and
size enters through the budget: to make room, the lowest-scoring entries
go first (ties: the larger, then the older), and a newcomer gets in only
when it scores at least as high as every entry it would push out
(L{PrefixIndex.victims}).
That is the rule against store-then-evict thrash: a fresh save never
displaces prefixes that are being reused, and an entry that was just
saved is never evicted to make room for one that scores lower. The
half life (an hour) lets a day-old conversation, however often it was
used, give way to today's.

An entry whose tokens extend another's (the next turn of the same
conversation) supersedes it: the shorter one is dropped and its hits
carry over. A prefix that an entry already covers is not saved again.

Covered by tests/unit/test_kvcache_index.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Seconds after which an idle entry's score halves.
HALF_LIFE = 3600.0


def value(hits: int, idle: float) -> float:
    """The score of an entry restored C{hits} times, idle for C{idle} seconds."""
    return (1 + hits) * 0.5 ** (max(0.0, idle) / HALF_LIFE)


def as_array(tokens: Sequence[int]) -> np.ndarray[Any, np.dtype[np.int64]]:
    return np.asarray(tokens, dtype=np.int64)


def common_prefix(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], limit: int) -> int:
    """How many leading tokens C{a} and C{b} share, at most C{limit}."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass(eq=False)
class Entry:
    """A saved prefix state in one tier."""

    tokens: np.ndarray[Any, np.dtype[np.int64]]
    #: Bytes it takes from the tier's budget.
    size: int
    hits: int = 0
    #: When it was saved or last restored (seconds, the index's clock).
    used: float = 0.0
    #: The tier's payload: the state's bytes (memory) or the file (disk).
    payload: Any = None
    #: Set while something still reads it (a restore, a write in flight):
    #: it stays out of eviction until then.
    pinned: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def score(self, now: float) -> float:
        return value(self.hits, now - self.used)


@dataclass(frozen=True)
class Match:
    entry: Entry
    #: Prompt tokens the entry's state covers.
    length: int


@dataclass
class PrefixIndex:
    """
    Entries of one tier under C{budget} bytes. Not thread-safe: the prompt
    cache serialises access.
    """

    budget: int
    clock: Callable[[], float] = time.time
    entries: list[Entry] = field(default_factory=list)

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self.entries))

    def match(
        self, prompt: np.ndarray[Any, Any], limit: int, *, max_tokens: int | None = None
    ) -> Match | None:
        """
        The entry sharing the longest prefix with C{prompt} (at most
        C{limit} tokens; entries longer than C{max_tokens} cannot be
        restored and are skipped). Ties go to the smaller state (less to
        restore), then the fresher entry.
        """
        best: Match | None = None
        for e in self.entries:
            if max_tokens is not None and e.n_tokens > max_tokens:
                continue
            m = common_prefix(e.tokens, prompt, limit)
            if m <= 0:
                continue
            if best is None or (m, -e.size, e.used) > (
                best.length,
                -best.entry.size,
                best.entry.used,
            ):
                best = Match(e, m)
        return best

    def covering(self, tokens: np.ndarray[Any, Any]) -> Entry | None:
        """An entry whose tokens start with all of C{tokens} (nothing to save)."""
        for e in self.entries:
            if e.n_tokens >= len(tokens) and common_prefix(e.tokens, tokens, len(tokens)) == len(
                tokens
            ):
                return e
        return None

    def superseded(self, tokens: np.ndarray[Any, Any]) -> list[Entry]:
        """Entries that are a strict prefix of C{tokens} (earlier turns)."""
        n = len(tokens)
        return [
            e
            for e in self.entries
            if e.n_tokens < n and common_prefix(e.tokens, tokens, e.n_tokens) == e.n_tokens
        ]

    def victims(
        self, size: int, score: float, *, excluding: Sequence[Entry] = ()
    ) -> list[Entry] | None:
        """
        The entries to evict so that C{size} more bytes fit, lowest score
        first; None when it cannot fit: larger than the budget, or it
        would push out an entry scoring above C{score} or one in use.
        Entries in C{excluding} are leaving anyway (superseded) and count
        as free space.
        """
        if size > self.budget:
            return None
        free, order, now = self._eviction_order(excluding)
        if size <= free:
            return []
        out: list[Entry] = []
        for e in order:
            if e.pinned or e.score(now) > score:
                return None
            out.append(e)
            free += e.size
            if size <= free:
                return out
        return None

    def overflow(self, size: int, excluding: Sequence[Entry] = ()) -> list[Entry]:
        """
        The entries to evict, lowest score first, so that C{size} more
        bytes fit, whatever they score (the budget must hold: a state
        larger than estimated, a budget lowered since the last run);
        entries in use are skipped.
        """
        free, order, _ = self._eviction_order(excluding)
        out: list[Entry] = []
        for e in order:
            if size <= free:
                break
            if not e.pinned:
                out.append(e)
                free += e.size
        return out

    def _eviction_order(self, excluding: Sequence[Entry]) -> tuple[int, list[Entry], float]:
        """The free bytes once C{excluding} left, the rest in eviction order, and now."""
        leaving = {id(e) for e in excluding}
        rest = [e for e in self.entries if id(e) not in leaving]
        now = self.clock()
        # Lowest score first; ties: the larger, then the older.
        rest.sort(key=lambda e: (e.score(now), -e.size, e.used))
        return self.budget - sum(e.size for e in rest), rest, now

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)

    def remove(self, entry: Entry) -> None:
        self.entries = [e for e in self.entries if e is not entry]

    def touch(self, entry: Entry) -> None:
        entry.hits += 1
        entry.used = self.clock()
