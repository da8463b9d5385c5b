"""
One tier of the prompt cache (L{ds4tw._engine.kvcache._index}): lookup by the
longest shared token prefix, the eviction score, and the admission rule
against store-then-evict thrash. Entries are fakes (sizes, no states);
time is an injected clock.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ds4tw._engine.kvcache._index import (
    HALF_LIFE,
    Entry,
    PrefixIndex,
    as_array,
    common_prefix,
    value,
)

NOW = 100_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def entry(
    tokens: Sequence[int], size: int = 100, *, hits: int = 0, used: float = NOW, pinned: int = 0
) -> Entry:
    return Entry(as_array(tokens), size, hits, used, pinned=pinned)


def index(*entries: Entry, budget: int = 1000, clock: Clock | None = None) -> PrefixIndex:
    tier = PrefixIndex(budget, clock or Clock())
    for e in entries:
        tier.add(e)
    return tier


def ids(entries: Sequence[Entry] | None) -> list[int] | None:
    return None if entries is None else [id(e) for e in entries]


# -- common_prefix ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "limit", "expected"),
    [
        pytest.param([], [], 10, 0, id="both-empty"),
        pytest.param([], [1, 2], 10, 0, id="one-empty"),
        pytest.param([1, 2, 3], [1, 2, 3], 10, 3, id="full-match"),
        pytest.param([1, 2, 3], [1, 2, 3], 3, 3, id="full-match-at-limit"),
        pytest.param([1, 2, 3], [1, 2, 3], 2, 2, id="capped-by-limit"),
        pytest.param([1, 2, 3], [1, 2, 3], 0, 0, id="limit-zero"),
        pytest.param([1, 2, 3], [1, 2, 3], -1, 0, id="limit-negative"),
        pytest.param([1, 2], [1, 2, 3, 4], 10, 2, id="a-is-a-prefix"),
        pytest.param([1, 2, 3, 4], [1, 2], 10, 2, id="b-is-a-prefix"),
        pytest.param([1, 2, 3, 4], [1, 2, 9, 4], 10, 2, id="differ-inside"),
        pytest.param([5, 2, 3], [1, 2, 3], 10, 0, id="differ-first"),
        pytest.param([1, 2, 3], [1, 2, 4], 10, 2, id="differ-last"),
    ],
)
def test_common_prefix(a: list[int], b: list[int], limit: int, expected: int) -> None:
    assert common_prefix(as_array(a), as_array(b), limit) == expected


def test_common_prefix_of_large_token_ids() -> None:
    big = [2**31 + 5, 2**32 - 1]
    assert common_prefix(as_array(big), as_array([2**31 + 5, 2**32 - 2]), 10) == 1


# -- match ------------------------------------------------------------------------------

PROMPT = as_array([1, 2, 3, 4, 5, 6, 7, 8])


@pytest.mark.parametrize("reverse", [False, True])
def test_match_longest_common_prefix_wins(reverse: bool) -> None:
    short = entry([1, 2, 3])
    longest = entry([1, 2, 3, 4, 5, 99, 99, 99, 99])  # its tail differs: still the best
    other = entry([1, 2, 3, 4, 9])
    stranger = entry([7, 2, 3, 4, 5, 6, 7, 8])
    entries = [short, longest, other, stranger]
    tier = index(*(reversed(entries) if reverse else entries))

    found = tier.match(PROMPT, len(PROMPT))
    assert found is not None
    assert found.entry is longest
    assert found.length == 5


def test_match_an_entry_longer_than_the_prompt() -> None:
    whole = entry([*PROMPT.tolist(), 9, 10])
    found = index(whole).match(PROMPT, len(PROMPT))
    assert found is not None and found.entry is whole and found.length == len(PROMPT)


def test_match_respects_the_limit() -> None:
    # The last prompt token must be computed (for its logits): never all of it.
    same = entry(PROMPT.tolist())
    longer = entry([*PROMPT.tolist(), 9])
    tier = index(same, longer)

    found = tier.match(PROMPT, len(PROMPT) - 1)
    assert found is not None and found.length == len(PROMPT) - 1
    found = tier.match(PROMPT, 3)
    assert found is not None and found.length == 3


def test_match_limit_zero_is_no_match() -> None:
    assert index(entry(PROMPT.tolist())).match(PROMPT, 0) is None


def test_match_skips_entries_longer_than_max_tokens() -> None:
    long = entry([1, 2, 3, 4, 5, 6, 0, 0, 0, 0])  # 10 tokens, shares 6
    short = entry([1, 2, 3, 4])  # 4 tokens, shares 4
    tier = index(long, short)

    found = tier.match(PROMPT, len(PROMPT), max_tokens=9)
    assert found is not None and found.entry is short
    found = tier.match(PROMPT, len(PROMPT), max_tokens=10)  # exactly max_tokens fits
    assert found is not None and found.entry is long
    found = tier.match(PROMPT, len(PROMPT))
    assert found is not None and found.entry is long
    assert tier.match(PROMPT, len(PROMPT), max_tokens=3) is None


@pytest.mark.parametrize("reverse", [False, True])
def test_match_tie_goes_to_the_smaller_state(reverse: bool) -> None:
    big = entry([1, 2, 3, 4, 0, 0, 0, 0, 0], size=900, used=NOW)
    small = entry([1, 2, 3, 4, 0], size=500, used=NOW - 10)  # older, but smaller
    tier = index(*([small, big] if reverse else [big, small]))

    found = tier.match(PROMPT, len(PROMPT))
    assert found is not None and found.entry is small and found.length == 4


@pytest.mark.parametrize("reverse", [False, True])
def test_match_tie_then_goes_to_the_fresher(reverse: bool) -> None:
    old = entry([1, 2, 3, 4, 0], used=NOW - 10)
    fresh = entry([1, 2, 3, 4, 9], used=NOW)
    tier = index(*([fresh, old] if reverse else [old, fresh]))

    found = tier.match(PROMPT, len(PROMPT))
    assert found is not None and found.entry is fresh


def test_match_length_beats_size() -> None:
    small = entry([1, 2, 3], size=10)
    big = entry([1, 2, 3, 4], size=10_000)
    found = index(small, big).match(PROMPT, len(PROMPT))
    assert found is not None and found.entry is big


def test_no_match() -> None:
    assert index().match(PROMPT, len(PROMPT)) is None
    assert index(entry([2, 3, 4]), entry([9])).match(PROMPT, len(PROMPT)) is None


# -- value and score --------------------------------------------------------------------


def test_value_grows_with_hits() -> None:
    assert value(0, 0.0) == 1.0
    assert value(0, 0.0) < value(1, 0.0) < value(5, 0.0)
    assert value(3, 0.0) == 4.0
    assert value(3, 100.0) > value(2, 100.0)


def test_value_halves_every_idle_half_life() -> None:
    assert value(3, HALF_LIFE) == pytest.approx(value(3, 0.0) / 2)
    assert value(3, 2 * HALF_LIFE) == pytest.approx(value(3, 0.0) / 4)
    assert value(3, 10.0) < value(3, 0.0)
    # An old favourite gives way to a fresh save.
    assert value(7, 4 * HALF_LIFE) < value(0, 0.0)


def test_value_of_a_negative_idle_is_not_above_fresh() -> None:
    assert value(2, -HALF_LIFE) == value(2, 0.0)


def test_score_follows_the_injected_clock() -> None:
    clock = Clock()
    tier = index(clock=clock)
    e = entry([1, 2], hits=1, used=NOW)
    tier.add(e)

    assert e.score(clock()) == 2.0
    clock.now += HALF_LIFE
    assert e.score(clock()) == pytest.approx(1.0)

    tier.touch(e)  # a restore: one more hit, idle again from now
    assert e.hits == 2 and e.used == clock.now
    assert e.score(clock()) == 3.0


# -- victims ----------------------------------------------------------------------------


def test_victims_none_needed_when_it_fits() -> None:
    tier = index(entry([1], size=300), entry([2], size=300))
    assert tier.victims(400, 0.0) == []  # exactly fits: 300 + 300 + 400
    assert index().victims(1000, 0.0) == []


def test_victims_larger_than_the_budget() -> None:
    assert index().victims(1001, 1e9) is None
    assert index(budget=0).victims(1, 1e9) is None


def scored_tier() -> tuple[PrefixIndex, Entry, Entry, Entry]:
    stale = entry([1], size=300, hits=0, used=NOW - 2 * HALF_LIFE)  # 0.25
    fresh = entry([2], size=300, hits=0, used=NOW)  # 1.0
    reused = entry([3], size=300, hits=3, used=NOW)  # 4.0
    return index(reused, fresh, stale), stale, fresh, reused


def test_victims_lowest_score_first_and_no_more_than_needed() -> None:
    tier, stale, fresh, reused = scored_tier()

    assert ids(tier.victims(200, 2.0)) == ids([stale])
    assert ids(tier.victims(400, 2.0)) == ids([stale])
    assert ids(tier.victims(401, 2.0)) == ids([stale, fresh])
    assert ids(tier.victims(1000, 4.5)) == ids([stale, fresh, reused])
    assert len(tier) == 3  # victims() only proposes


def test_victims_refused_when_a_victim_outscores_the_newcomer() -> None:
    tier, _, _, _ = scored_tier()

    # A fresh save (score 1) may push out the stale entry...
    assert tier.victims(300, value(0, 0.0)) is not None
    # ...but a stale newcomer may not push out the fresh one,
    assert tier.victims(500, 0.5) is None
    # nor a fresh save the entry being reused.
    assert tier.victims(1000, value(0, 0.0)) is None
    assert tier.victims(1000, 3.9) is None


def test_victims_equal_score_may_be_evicted() -> None:
    # victims() refuses an entry "scoring above" the newcomer: a tie is
    # no reason to refuse.
    tier = index(entry([1], size=1000, hits=0, used=NOW))
    victims = tier.victims(1, value(0, 0.0))
    assert victims is not None and len(victims) == 1


def test_victims_ties_larger_then_older_first() -> None:
    # All score 1.0: 2 * 0.5 ** 1 == 1 * 0.5 ** 0.
    small_new = entry([1], size=200, hits=0, used=NOW)
    small_old = entry([2], size=200, hits=1, used=NOW - HALF_LIFE)
    large = entry([3], size=400, hits=0, used=NOW)
    now = NOW
    assert small_new.score(now) == small_old.score(now) == large.score(now) == 1.0
    tier = index(small_new, small_old, large, budget=800)

    assert ids(tier.victims(1, 1.0)) == ids([large])
    assert ids(tier.victims(401, 1.0)) == ids([large, small_old])
    assert ids(tier.victims(800, 1.0)) == ids([large, small_old, small_new])


def test_victims_refused_when_one_is_pinned() -> None:
    tier, stale, _, _ = scored_tier()
    stale.pinned = 1  # being restored or written
    assert tier.victims(200, 1e9) is None
    stale.pinned = 0
    assert ids(tier.victims(200, 1e9)) == ids([stale])


def test_victims_a_pinned_entry_not_reached_does_not_matter() -> None:
    tier, stale, _, reused = scored_tier()
    reused.pinned = 1
    assert ids(tier.victims(200, 2.0)) == ids([stale])


def test_victims_excluding_counts_as_free() -> None:
    earlier = entry([1, 2], size=500, hits=9)  # superseded: leaving anyway
    other = entry([5], size=500, hits=0, used=NOW - HALF_LIFE)  # 0.5
    tier = index(earlier, other)

    assert tier.victims(500, 0.0, excluding=[earlier]) == []
    # Needing more: the others are evicted, never the excluded entry (nor
    # does its score, above the newcomer's, refuse the save).
    assert ids(tier.victims(600, 1.0, excluding=[earlier])) == ids([other])
    assert tier.victims(600, 1.0) is None


# -- covering and superseded -------------------------------------------------------------


def test_covering() -> None:
    held = entry([1, 2, 3, 4])
    tier = index(entry([1, 2, 9, 9, 9]), held)

    assert tier.covering(as_array([1, 2, 3])) is held
    assert tier.covering(as_array([1, 2, 3, 4])) is held
    assert tier.covering(as_array([1, 2, 3, 4, 5])) is None  # more than it holds
    assert tier.covering(as_array([1, 2, 3, 5])) is None
    assert tier.covering(as_array([2])) is None
    assert index().covering(as_array([1])) is None


def test_superseded() -> None:
    turn1 = entry([1, 2])
    turn2 = entry([1, 2, 3])
    same = entry([1, 2, 3, 4])
    longer = entry([1, 2, 3, 4, 5])
    branch = entry([1, 3])
    tier = index(turn1, turn2, same, longer, branch)

    gone = tier.superseded(as_array([1, 2, 3, 4]))
    assert sorted(ids(gone) or []) == sorted(ids([turn1, turn2]) or [])
    assert tier.superseded(as_array([1])) == []
    assert tier.superseded(as_array([9, 9, 9])) == []


# -- bookkeeping ------------------------------------------------------------------------


def test_used_bytes() -> None:
    a = entry([1], size=300)
    b = entry([2], size=450)
    twin = entry([2], size=450)  # equal fields, another entry
    tier = index(budget=10_000)
    assert tier.used_bytes == 0 and len(tier) == 0

    tier.add(a)
    tier.add(b)
    tier.add(twin)
    assert tier.used_bytes == 1200 and len(tier) == 3

    tier.remove(b)
    assert tier.used_bytes == 750
    assert ids(list(tier)) == ids([a, twin])  # removed by identity, not equality

    tier.remove(b)  # already gone: nothing happens
    assert tier.used_bytes == 750


def test_iteration_is_over_a_copy() -> None:
    tier = index(entry([1]), entry([2]), entry([3]))
    for e in tier:
        tier.remove(e)
    assert len(tier) == 0 and tier.used_bytes == 0
