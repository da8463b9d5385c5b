"""
Where a new sequence's prefix comes from, for either engine: its own
retained slot, another slot (copied), the prompt cache's memory or its
disk, or nowhere (a miss). The engines apply the decisions to their KV
cache through L{States}.

Covered by tests/unit/test_kvcache.py (scripted engine) and
tests/integration/test_prompt_cache.py (the real one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from twisted.logger import Logger

from ..slots import Claim, SlotTable, common_prefix
from ._cache import CacheStats, PromptCache, Restore, State

if TYPE_CHECKING:
    # Only named: the prompt cache sits below the engine interface
    # (ds4tw._engine.interface names its types), which the template module imports.
    from ..template import ChatTemplate

log = Logger()


class States(Protocol):
    """An engine's per-sequence state calls (model thread)."""

    def state(self, slot: int) -> State:
        """The whole state of C{slot}'s sequence (its cells, in order)."""

    def restore(self, slot: int, data: State, keep: int) -> bool:
        """
        Replace C{slot}'s cells with C{data}'s, then keep only the first
        C{keep}; False (and nothing left in the slot) if it failed.
        """


@dataclass(frozen=True)
class Opened:
    claim: Claim
    #: A restore to run before the sequence's prefill, when one beats the claim.
    restore: Restore | None


def template_opening(template: ChatTemplate, tokenize: Callable[..., list[int]]) -> int:
    """
    How many tokens every prompt starts with: the chat template's opening
    (its header, a default system prompt), as two unrelated one-message
    conversations share it. C{tokenize} is the engine's (prompts are
    tokenized without an added BOS: the template writes its own). 0 if
    the template will not render them.
    """
    try:
        a, b = (
            tokenize(template.render([{"role": "user", "content": text}]).text, add_bos=False)
            for text in ("Hello there.", "Quite another question?")
        )
    except Exception:
        log.failure("ds4tw: could not measure the chat template's opening")
        return 0
    return common_prefix(a, b, min(len(a), len(b)))


class Prefixes:
    def __init__(self, table: SlotTable, cache: PromptCache | None = None) -> None:
        self.table = table
        self.cache = cache
        self.stats = cache.stats if cache is not None else CacheStats()
        #: Tokens every prompt shares (L{template_opening}): reusing no
        #: more than these is not a hit.
        self.opening = 0

    def open(self, prompt: Sequence[int], states: States) -> Opened:
        """
        Claim a slot for C{prompt} (L{SlotTable.claim}); save what the slot
        held to the cache first when the claim drops it; plan a restore
        when the cache holds a longer prefix than any slot.
        """
        claim = self.table.claim(prompt)
        cache = self.cache
        if cache is None or not cache.enabled:
            return Opened(claim, None)
        if claim.evicted >= cache.min_tokens:
            # The cells are still there: the engine trims them after this.
            cache.keep(claim.previous, lambda: states.state(claim.slot))
        restore = None
        if self.table.reuse:
            found = cache._lookup(prompt, len(prompt) - 1)
            if found is not None and cache._worth(found, claim.cached):
                restore = cache._fetch(found)
        return Opened(claim, restore)

    def restore(
        self, slot: int, prompt: Sequence[int], restore: Restore, states: States
    ) -> int | None:
        """
        Run a planned restore (its state loaded): the tokens now cached in
        C{slot}, or None when the state could not be loaded (the slot is
        as it was).
        """
        data = restore.result()
        if data is None:
            restore.settle(False)
            return None
        ok = states.restore(slot, data, restore.length)
        restore.settle(ok)
        held = self.table.slots[slot].tokens
        held[:] = prompt[: restore.length] if ok else []
        return len(held)

    def settle(
        self,
        slot: int,
        prompt: Sequence[int],
        restore: Restore,
        states: States,
        cached: int,
        source: str | None,
    ) -> tuple[int, str | None]:
        """
        Run a loaded restore for a sequence that has C{cached} tokens from
        C{source} so far; return what it has after it (its prefix is then
        settled, and counted).
        """
        got = self.restore(slot, prompt, restore, states)
        if got is not None:
            cached, source = got, restore.tier if got else None
        self.count(source, cached)
        return cached, source

    def count(self, source: str | None, cached: int) -> None:
        """
        A request's prefix is settled: a hit from C{source}, or a miss. A
        prompt that reused only the chat template's opening, which every
        prompt shares, is a miss: counted as a hit, any new conversation
        on a busy server was one, and the hit rate said nothing.
        """
        if cached > self.opening and source is not None:
            self.stats.hits[source] += 1
        else:
            self.stats.misses += 1

    def computed(self, slot: int, prompt: Sequence[int], fresh: int, states: States) -> None:
        """C{slot} just finished prefilling C{prompt}, C{fresh} tokens computed."""
        if self.cache is not None:
            self.cache.computed(prompt, fresh, lambda: states.state(slot))

    def close(self, states: States) -> None:
        """Shutdown: the cache saves the slots' prefixes (and its memory) to disk."""
        if self.cache is None:
            return
        retained = [
            (list(s.tokens), lambda i=s.id: states.state(i))
            for s in self.table.slots
            if not s.busy and s.tokens
        ]
        self.cache.close(retained)
