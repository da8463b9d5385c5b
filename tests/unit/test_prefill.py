"""
The prefill policy (L{ds4tw._engine.prefill.PrefillOrder}): shortest remaining
prompt first, and no prompt starves behind a stream of shorter ones.
Through the worker and the scripted engine in tests/unit/test_scheduler.py.
"""

from __future__ import annotations

from ds4tw._engine.prefill import AGING_STEPS, PrefillOrder


def test_the_shortest_remaining_prompt_goes_first_and_the_next_gets_what_is_left() -> None:
    order = PrefillOrder()
    assert order.plan({0: 20, 1: 5, 2: 12}, 8) == [(1, 5), (2, 3)]
    # Ties by sequence id, and a budget larger than all of it serves all.
    assert order.plan({3: 4, 1: 4}, 100) == [(1, 4), (3, 4)]


def test_between_equal_remainders_the_one_passed_over_goes_first() -> None:
    order = PrefillOrder()
    assert order.plan({0: 8, 1: 8}, 8) == [(0, 8)]
    # 1 waited a step; 0's slot has a new prompt of the same length.
    order.forget(0)
    assert order.plan({0: 8, 1: 8}, 8) == [(1, 8)]


def test_nothing_to_prefill_plans_nothing() -> None:
    order = PrefillOrder()
    assert order.plan({}, 64) == []
    assert order.plan({0: 10}, 0) == []
    assert order.passed_over(0) == 0  # no budget at all: nobody was passed over


def test_a_prompt_passed_over_long_enough_goes_first_for_one_step() -> None:
    order = PrefillOrder(aging_steps=3)
    # Slot 0 has a long prompt; slot 1 gets a new short one every step.
    plans = [order.plan({0: 1000, 1: 8}, 8) for _ in range(8)]
    assert plans == [
        [(1, 8)],
        [(1, 8)],
        [(1, 8)],
        [(0, 8)],  # passed over three steps in a row: it leads
        [(1, 8)],
        [(1, 8)],
        [(1, 8)],
        [(0, 8)],
    ]


def test_a_crumb_of_the_budget_is_still_passed_over() -> None:
    order = PrefillOrder(aging_steps=2)
    # The short ones leave it 1 token of 9 per step: less than an even share (3).
    assert order.plan({0: 1000, 1: 4, 2: 4}, 9) == [(1, 4), (2, 4), (0, 1)]
    assert order.passed_over(0) == 1
    order.plan({0: 999, 1: 4, 2: 4}, 9)
    assert order.plan({0: 998, 1: 4, 2: 4}, 9) == [(0, 9)]
    assert order.passed_over(0) == 0


def test_an_even_share_or_the_whole_remainder_is_not_passed_over() -> None:
    order = PrefillOrder(aging_steps=1)
    # 0 gets 4 of 8, an even share between two: never aged past the short one.
    for _ in range(5):
        assert order.plan({0: 100, 1: 4}, 8) == [(1, 4), (0, 4)]
    assert order.passed_over(0) == 0
    # 2 gets its whole remainder (1 token), less than an even share: served.
    order.plan({0: 100, 2: 1}, 8)
    assert order.passed_over(2) == 0


def test_among_aged_prompts_the_longest_passed_over_leads() -> None:
    order = PrefillOrder(aging_steps=2)
    for _ in range(2):
        order.plan({0: 500, 1: 8, 2: 300}, 8)  # 1 served; 0 and 2 passed over
    assert (order.passed_over(0), order.passed_over(2)) == (2, 2)
    # Both aged, equally: by sequence id. 2 waits one step more...
    assert order.plan({0: 500, 1: 8, 2: 300}, 8) == [(0, 8)]
    assert order.passed_over(2) == 3
    # ... so it leads next, ahead of the shorter prompt and of 0.
    assert order.plan({0: 492, 1: 8, 2: 300}, 8) == [(2, 8)]


def test_a_new_sequence_in_a_slot_inherits_no_waiting() -> None:
    order = PrefillOrder(aging_steps=2)
    order.plan({0: 500, 1: 8}, 8)
    order.plan({0: 500, 1: 8}, 8)
    assert order.passed_over(0) == 2
    order.forget(0)  # released, and the slot opened for another prompt
    assert order.plan({0: 500, 1: 8}, 8) == [(1, 8)]
    # And a sequence that left the plan (prompt done, or released) is forgotten.
    order.plan({1: 8}, 8)
    assert order.passed_over(0) == 0


def test_the_default_bound() -> None:
    # A prompt leads at least one step in every AGING_STEPS + 1.
    order = PrefillOrder()
    led = [order.plan({0: 10_000, 1: 64}, 64)[0][0] == 0 for _ in range(4 * (AGING_STEPS + 1))]
    assert sum(led) == 4
