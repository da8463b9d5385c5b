"""
The slot table alone (L{ds4tw._engine.slots.SlotTable}), on made-up token lists:
which slot a new prompt runs in, what it may reuse, and what is evicted.

The engine extends a claimed slot's C{tokens} as it computes; L{compute}
does the same here, so each test states exactly what every slot holds.
"""

from __future__ import annotations

import pytest

from ds4tw._engine.slots import Claim, SlotTable


def compute(table: SlotTable, claim: Claim, prompt: list[int]) -> None:
    """What the engine does after a claim: the whole prompt is now in the slot."""
    table.slots[claim.slot].tokens = list(prompt)


def fill(table: SlotTable, *prompts: list[int]) -> list[Claim]:
    """
    Run C{prompts} at once (each computed), then end them in order: the
    first ends least recently. Every prompt lands in the next empty slot.
    """
    claims = []
    for prompt in prompts:
        claim = table.claim(prompt)
        compute(table, claim, prompt)
        claims.append(claim)
    for claim in claims:
        table.release(claim.slot)
    return claims


def held(table: SlotTable) -> list[list[int]]:
    return [s.tokens for s in table.slots]


# -- which slot, what is reused ------------------------------------------------


def test_an_empty_table_reuses_nothing_and_fills_slots_in_order() -> None:
    table = SlotTable(3)
    claims = fill(table, [1, 2, 3], [4, 5, 6], [7, 8, 9])
    assert [c.slot for c in claims] == [0, 1, 2]
    assert all(c.cached == 0 and c.source is None and c.evicted == 0 for c in claims)
    assert held(table) == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert table.busy == 0


def test_the_longest_match_wins_across_slots() -> None:
    table = SlotTable(3)
    fill(table, [1, 2, 3, 9], [7, 8], [1, 2, 3, 4, 5, 9])
    assert held(table)[2] == [1, 2, 3, 4, 5, 9]
    claim = table.claim([1, 2, 3, 4, 5, 6, 7])
    # Slot 0 shares 3 tokens, slot 2 shares 5: slot 2, continued in place.
    assert claim == Claim(slot=2, cached=5, source=2, evicted=1)
    assert table.slots[2].tokens == [1, 2, 3, 4, 5] and table.slots[2].busy
    # The others are untouched.
    assert held(table)[:2] == [[1, 2, 3, 9], [7, 8]]


def test_a_tie_goes_to_a_free_slot_even_when_the_busy_one_is_fresher() -> None:
    table = SlotTable(2)
    fill(table, [1, 2, 3, 4, 8], [1, 2, 3, 4, 9])
    # Slot 1 runs again (the fresher of the two), busy.
    again = table.claim([1, 2, 3, 4, 9, 0])
    assert (again.slot, again.cached) == (1, 5)
    compute(table, again, [1, 2, 3, 4, 9, 0])
    claim = table.claim([1, 2, 3, 4, 5])
    # Both share 4 tokens; the free one needs no copy.
    assert claim == Claim(slot=0, cached=4, source=0, evicted=1)


def test_a_tie_between_free_slots_goes_to_the_most_recently_used() -> None:
    table = SlotTable(2)
    fill(table, [1, 2, 3, 8], [1, 2, 3, 9])  # slot 1 ended last
    first = table.claim([1, 2, 3, 7])
    assert (first.slot, first.cached, first.source) == (1, 3, 1)
    table.release(first.slot)
    # Now touch slot 0: it becomes the fresher one.
    touch = table.claim([1, 2, 3, 8, 5])
    assert (touch.slot, touch.cached) == (0, 4)
    table.release(touch.slot)
    second = table.claim([1, 2, 3, 7])
    assert (second.slot, second.cached, second.source) == (0, 3, 0)


def test_a_match_in_a_busy_slot_is_copied_into_a_free_slot() -> None:
    table = SlotTable(3)
    fill(table, [5, 5, 5])  # slot 0 holds something else, ended
    running = table.claim([1, 2, 3, 4, 5, 6])
    assert running.slot == 1  # an empty slot before the retained one
    compute(table, running, [1, 2, 3, 4, 5, 6])
    claim = table.claim([1, 2, 3, 4, 9])
    # Slot 1 shares 4 tokens but runs: its cells are copied into slot 2
    # (empty, so before slot 0's retained prompt), which holds them now.
    assert claim == Claim(slot=2, cached=4, source=1, evicted=0)
    assert held(table) == [[5, 5, 5], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4]]
    assert table.slots[1].busy and table.slots[2].busy and not table.slots[0].busy


def test_a_copy_from_a_busy_slot_evicts_the_target_when_no_slot_is_empty() -> None:
    table = SlotTable(2)
    fill(table, [5, 5, 5], [6, 6, 6, 6])
    running = table.claim([6, 6, 6, 6, 1])
    assert running.slot == 1
    compute(table, running, [6, 6, 6, 6, 1])
    claim = table.claim([6, 6, 6, 6, 2])
    assert claim == Claim(slot=0, cached=4, source=1, evicted=3)
    assert table.slots[0].tokens == [6, 6, 6, 6]


def test_never_the_whole_prompt_is_cached() -> None:
    table = SlotTable(1)
    fill(table, [1, 2, 3, 4])
    # The same prompt again: the last token is computed again for logits.
    same = table.claim([1, 2, 3, 4])
    assert same == Claim(slot=0, cached=3, source=0, evicted=1)
    assert table.slots[0].tokens == [1, 2, 3]
    table.release(0)
    table.slots[0].tokens = [1, 2, 3, 4, 5, 6]
    # A prompt that is a prefix of what the slot holds.
    shorter = table.claim([1, 2, 3])
    assert (shorter.cached, shorter.evicted) == (2, 4)
    table.release(0)
    # A one-token prompt reuses nothing at all.
    one = table.claim([1])
    assert (one.cached, one.source, one.evicted) == (0, None, 2)
    assert table.slots[0].tokens == []


# -- eviction --------------------------------------------------------------------


def test_an_empty_slot_is_taken_before_any_retained_one() -> None:
    table = SlotTable(2)
    fill(table, [1, 1, 1])
    # Slot 1 is used and left empty (its request kept nothing): it is the
    # most recently used slot, and still taken before slot 0's prompt.
    empty = table.claim([2, 2])
    assert empty.slot == 1
    compute(table, empty, [2, 2])
    table.release(empty.slot, keep=0)
    assert table.slots[1].tokens == [] and table.slots[1].used > table.slots[0].used
    claim = table.claim([3, 3, 3])
    assert claim == Claim(slot=1, cached=0, source=None, evicted=0)
    assert table.slots[0].tokens == [1, 1, 1]


def test_eviction_takes_the_least_recently_used_free_slot() -> None:
    table = SlotTable(3)
    fill(table, [1, 1, 1], [2, 2, 2], [3, 3, 3])  # ended in that order
    # Slot 0 runs again: now slot 1 is the least recently used.
    again = table.claim([1, 1, 1, 4])
    assert again.slot == 0
    first = table.claim([7, 7])
    assert first == Claim(slot=1, cached=0, source=None, evicted=3)
    compute(table, first, [7, 7])
    table.release(first.slot)
    # Slot 0 is busy, however old its last use: slot 2 goes next.
    second = table.claim([8, 8])
    assert second == Claim(slot=2, cached=0, source=None, evicted=3)
    assert held(table) == [[1, 1, 1], [7, 7], []]


def test_a_short_shared_prefix_does_not_evict_a_retained_conversation() -> None:
    table = SlotTable(2)
    header = [1, 60, 61, 62]
    conversation = [*header, *range(100, 140)]
    fill(table, conversation)
    # Another conversation: it shares the header only.
    claim = table.claim([*header, 7, 8, 9])
    # The empty slot takes it (the header may be copied from slot 0)...
    assert claim.slot == 1
    # ...and the conversation stays whole for its next turn.
    assert table.slots[0].tokens == conversation


# -- release ---------------------------------------------------------------------


def test_release_keeps_every_token_or_the_first_keep() -> None:
    table = SlotTable(2)
    a = table.claim([1, 2, 3])
    b = table.claim([4, 5, 6])
    table.slots[a.slot].tokens = [1, 2, 3, 1000, 1001]  # prompt plus output
    table.slots[b.slot].tokens = [4, 5, 6, 1000, 1001]
    assert table.busy == 2
    assert table.release(a.slot) == 0
    assert table.slots[a.slot].tokens == [1, 2, 3, 1000, 1001]
    assert table.release(b.slot, keep=3) == 2
    assert table.slots[b.slot].tokens == [4, 5, 6]
    assert table.busy == 0
    # keep beyond what the slot holds drops nothing.
    c = table.claim([9, 9])
    assert table.release(c.slot, keep=10) == 0


def test_release_marks_the_slot_free_and_fresh() -> None:
    table = SlotTable(2)
    a = table.claim([1, 2])
    claimed_at = table.slots[a.slot].used
    assert table.slots[a.slot].busy and [s.id for s in table.free()] == [1]
    table.release(a.slot)
    assert not table.slots[a.slot].busy and table.slots[a.slot].used > claimed_at
    assert [s.id for s in table.free()] == [0, 1]


def test_without_reuse_nothing_is_ever_cached() -> None:
    table = SlotTable(2, reuse=False)
    first = table.claim([1, 2, 3, 4])
    compute(table, first, [1, 2, 3, 4])
    # Even a busy slot holding the prefix is not copied from.
    other = table.claim([1, 2, 3, 4, 5])
    assert other == Claim(slot=1, cached=0, source=None, evicted=0)
    compute(table, other, [1, 2, 3, 4, 5])
    # Release drops everything, kept or not.
    assert table.release(first.slot) == 4
    assert table.release(other.slot, keep=2) == 5
    assert held(table) == [[], []]
    again = table.claim([1, 2, 3, 4])
    assert (again.cached, again.source, again.evicted) == (0, None, 0)


def test_a_claim_with_every_slot_busy_raises() -> None:
    table = SlotTable(2)
    table.claim([1, 2])
    table.claim([1, 2])
    assert table.busy == 2
    with pytest.raises(RuntimeError, match="every slot is busy"):
        table.claim([3, 4])
    # Nothing changed.
    assert table.busy == 2 and held(table) == [[], []]


def test_a_table_needs_a_slot() -> None:
    with pytest.raises(ValueError):
        SlotTable(0)


def test_a_claim_that_drops_tokens_says_what_the_slot_held() -> None:
    table = SlotTable(1)
    table.claim([1, 2, 3, 4])
    table.slots[0].tokens[:] = [1, 2, 3, 4]  # what the engine computed
    table.release(0)
    # The prompt cache saves these before the engine trims the cells.
    assert table.claim([7, 8, 9]).previous == (1, 2, 3, 4)
    table.slots[0].tokens[:] = [7, 8, 9]
    table.release(0)
    assert table.claim([7, 8, 9, 10]).previous == ()  # nothing dropped
