"""
Who gets a step's prompt budget: the one prefill policy both engines use.

Shortest remaining prompt first, so that a short turn (an agent's next
message after a cached prefix, a title request) gets its first token
without waiting behind a long cold prompt. Alone, that policy can starve:
while other slots keep receiving short prompts (a batch client sending
many small requests with C{max_tokens=1}), the long one gets only what
they leave of each step, possibly nothing, for as long as they come. So
a sequence that got less than an even split of the budget for
L{AGING_STEPS} steps in a row goes first in the next one: a long prompt
leads at least one step in every C{AGING_STEPS + 1} however busy the other
slots are, and in the usual case (a short prompt arriving during a long
prefill is done in a step or two) nothing changes.

Covered by tests/unit/test_prefill.py and, through the scripted engine,
tests/unit/test_scheduler.py.
"""

from __future__ import annotations

from collections.abc import Mapping

#: Steps in a row with less than a fair share before a prompt goes first.
AGING_STEPS = 8


class PrefillOrder:
    """The per-engine record of how long each prefilling sequence has been passed over."""

    def __init__(self, aging_steps: int = AGING_STEPS) -> None:
        self.aging_steps = aging_steps
        #: Sequence id -> steps in a row it got less than its fair share.
        self._passed: dict[int, int] = {}

    def plan(self, remaining: Mapping[int, int], budget: int) -> list[tuple[int, int]]:
        """
        Share C{budget} prompt tokens among the sequences still prefilling
        (C{remaining}: sequence id -> prompt tokens it has left), and note
        who was passed over. Returns C{(id, tokens)} in the order the
        chunks go into the batch, only those that get tokens.

        Sequences not in C{remaining} are forgotten (finished their prompt,
        or released).
        """
        if not remaining:
            self._passed = {}
            return []
        passed = self._passed
        aged = sorted(
            (i for i in remaining if passed.get(i, 0) >= self.aging_steps),
            key=lambda i: (-passed[i], i),
        )
        # Equal remainders: the one passed over longer first, not always
        # the lower slot (a flood of equal prompts would keep one waiting).
        rest = sorted(
            (i for i in remaining if i not in aged),
            key=lambda i: (remaining[i], -passed.get(i, 0), i),
        )
        # What each would get if the budget were split evenly: less than
        # that (or than its whole remainder) counts as passed over.
        fair = max(1, budget // len(remaining)) if budget > 0 else 0
        shares: list[tuple[int, int]] = []
        now: dict[int, int] = {}
        left = budget
        for i in (*aged, *rest):
            n = min(left, remaining[i])
            if n > 0:
                shares.append((i, n))
                left -= n
            now[i] = 0 if n >= min(fair, remaining[i]) else passed.get(i, 0) + 1
        self._passed = now
        return shares

    def forget(self, seq: int) -> None:
        """C{seq} starts a new sequence: it inherits no waiting time."""
        self._passed.pop(seq, None)

    def passed_over(self, seq: int) -> int:
        """Steps in a row C{seq} got less than its fair share (for tests and logs)."""
        return self._passed.get(seq, 0)
