"""
Prefill fairness: a long prompt's time to first token while the other
slots get a flood of short prompts, with the prefill order's aging
(C{prefill_aging} on the engine) and without it, against the same kind
of prompt alone, in one process and one run.

The engine runs in this process (L{ds4tw.LlamaEngine} on the run's model,
or a paced L{ds4tw.testing.ScriptedEngine} with C{--engine scripted}),
with L{SLOTS} slots and the run's C{--batch} as the step budget, driven
step by step as the server's model thread drives it:

  1. alone: the long prompt (L{Sizes.long_tokens}) on an idle engine,
     once before the floods and once after (the baseline is their
     median, so a drift over the part shows in both trials);
  2. flood, aging on: the long prompt opened, then L{FLOOD_SLOTS} slots
     kept full of short prompts (L{Sizes.short_tokens} tokens,
     C{max_tokens=1}: the batch client sending many small requests that
     the aging was written for), each replaced after every step as soon
     as it has its token, until the long prompt has its first token;
  3. flood, aging off (the engine's order swapped for one whose aging
     never triggers: shortest remaining first, as before the aging): the
     same, except that the flood stops after L{Sizes.cap_steps} steps,
     since the long prompt would otherwise wait as long as the flood
     lasts. Its TTFT is therefore a lower bound, and the tokens it had
     prefilled when the flood stopped say how far it got on its own.

Each prompt is distinct random token ids (their first tokens all
different), so no prefix is reused: the engines reuse what a slot holds,
and the largest reused count seen is recorded (0 when the premise held).

Every TTFT is from just before C{open()} to the end of the step that
produced the token. A step "led" by the long prompt is one whose prompt
chunks start with it (L{ds4tw._engine.interface.StepResult.sequences} lists the
decoding sequences, then the prefilled ones in the order of the plan).
The aging's promise is checkable in steps, whatever the machine: under a
flood the long prompt leads at least one step in every C{AGING_STEPS + 1}
and gets the whole budget when it does, so it needs at most
L{bound_steps} steps.

Covered by tests/unit/test_bench.py (L{summarize}, and L{measure} on an
instant scripted engine) and used by C{ds4tw-bench --only batching}.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ds4tw import Engine

from ._batching import Foreign
from ._settings import Settings
from ._stats import ratio, summary

#: Slots of the engine (ds4tw's default C{--parallel}): one long prompt, the rest flooded.
SLOTS = 4
FLOOD_SLOTS = SLOTS - 1
#: The long prompt (full run, C{--quick}); about 2.5 s alone on the demo model.
LONG_TOKENS = 1024
QUICK_LONG_TOKENS = 512
#: Each short prompt of the flood.
SHORT_TOKENS = 200
#: The flood without aging stops after this many times the aging bound.
CAP_FACTOR = 2
#: An aging threshold no prompt reaches: the order without aging.
#: The engines' default for how long a prompt may be passed over
#: (LlamaEngine.prefill_aging); the part reads the loaded engine's own.
AGING_STEPS = 8
#: Token ids are drawn from this range (cut to the vocabulary): clear of the
#: low ids where vocabularies keep their special tokens.
VOCAB_LOW, VOCAB_HIGH = 1000, 40000
#: A bound on any trial's steps (a policy bug must not hang the benchmark).
MAX_STEPS = 2000


@dataclass(frozen=True)
class Sizes:
    """What the part measures, for the full run or C{--quick}."""

    long_tokens: int
    short_tokens: int
    flood_slots: int
    batch: int
    #: The most steps the long prompt may need under a flood with aging.
    bound_steps: int
    #: The flood without aging stops after this many steps.
    cap_steps: int
    alone_trials: int


def bound_steps(long_tokens: int, batch: int, aging_steps: int = AGING_STEPS) -> int:
    """
    The most steps a C{long_tokens} prompt needs with aging, however busy
    the other slots: it leads at least one step in every C{aging_steps + 1}
    and gets the whole budget (C{batch}: the flood's prompts never decode)
    when it does.
    """
    return (aging_steps + 1) * math.ceil(long_tokens / batch)


def sizes(settings: Settings, aging_steps: int = AGING_STEPS) -> Sizes:
    # The long prompt and its token must fit one slot's --ctx.
    room = max(64, settings.ctx - 64)
    long = min(QUICK_LONG_TOKENS if settings.quick else LONG_TOKENS, room)
    bound = bound_steps(long, settings.batch, aging_steps)
    return Sizes(
        long_tokens=long,
        short_tokens=min(SHORT_TOKENS, room),
        flood_slots=FLOOD_SLOTS,
        batch=settings.batch,
        bound_steps=bound,
        cap_steps=CAP_FACTOR * bound,
        alone_trials=2,
    )


def scripted_engine(settings: Settings) -> Any:
    """
    A L{ds4tw.testing.ScriptedEngine} paced like the batching part's
    scripted server (a step takes its prompt tokens over the run's
    scripted prefill rate), with L{SLOTS} slots and C{--batch} as budget.
    """
    from ds4tw.testing import ScriptedEngine

    prefill_tps = settings.scripted_prefill_batch * 1000.0 / settings.scripted_prefill_ms
    engine = ScriptedEngine(
        n_ctx=settings.ctx,
        n_batch=settings.batch,
        prefill_tps=prefill_tps,
        slots=SLOTS,
    )
    engine.load()
    return engine


class Prompts:
    """
    Random prompts of distinct token ids whose first tokens all differ,
    so that no prompt shares a prefix with another (or with what a slot
    retains of one).
    """

    def __init__(self, seed: int, vocab: int) -> None:
        hi = max(VOCAB_LOW + 2, min(vocab, VOCAB_HIGH))
        self._rnd = random.Random(seed)
        self._ids = range(VOCAB_LOW, hi)
        self._firsts: Iterator[int] = iter(self._rnd.sample(self._ids, len(self._ids)))

    def make(self, n: int) -> list[int]:
        first = next(self._firsts)
        rest = self._rnd.choices(self._ids, k=n - 1)
        return [first, *rest]


def _vocab(engine: Engine) -> int:
    """The model's vocabulary size (the scripted engine takes any id: capped by the caller)."""
    return engine.n_vocab


def trial(
    engine: Any,
    prompts: Prompts,
    sz: Sizes,
    *,
    flood: bool,
    cap_steps: int | None = None,
) -> dict[str, Any]:
    """
    One long prompt to its first token, alone or beside the flood (which
    stops after C{cap_steps} steps when given); what it took, in seconds
    and steps, and what the short prompts got meanwhile.
    """
    from ds4tw import PrefillProgress, SamplingParams, Token

    params = SamplingParams(max_tokens=1, temperature=0.0)
    foreign = Foreign()
    before = foreign.sample()
    t0 = time.perf_counter()
    long = engine.open(prompts.make(sz.long_tokens), params)
    # Open short prompts: sequence -> (when opened, steps done by then).
    shorts: dict[int, tuple[float, int]] = {}
    short_ttft: list[float] = []
    short_steps: list[int] = []
    steps = led = long_done = cached = 0
    at_cap: int | None = None
    long_ttft: float | None = None

    def refill() -> None:
        while flood and len(shorts) < sz.flood_slots and (cap_steps is None or steps < cap_steps):
            opened = time.perf_counter()
            shorts[engine.open(prompts.make(sz.short_tokens), params)] = (opened, steps)

    try:
        refill()
        while long_ttft is None:
            if steps >= MAX_STEPS:
                raise RuntimeError(f"no first token for the long prompt after {steps} steps")
            result = engine.step()
            steps += 1
            now = time.perf_counter()
            chunks = result.sequences[result.decode_tokens :]
            led += bool(chunks) and chunks[0] == long
            answered = []
            for seq, event in result.events:
                if isinstance(event, PrefillProgress):
                    cached = max(cached, event.cached)
                    if seq == long:
                        long_done = event.done
                elif isinstance(event, Token):
                    if seq == long:
                        long_ttft = now - t0
                    elif seq in shorts:
                        opened, at = shorts.pop(seq)
                        short_ttft.append(now - opened)
                        short_steps.append(steps - at)
                        answered.append(seq)
            for seq in answered:
                engine.release(seq)
            if cap_steps is not None and steps == cap_steps and long_ttft is None:
                at_cap = long_done
            refill()
    finally:
        for seq in shorts:
            engine.release(seq, keep_output=False)
        engine.release(long, keep_output=False)
    return {
        "long_ttft_s": long_ttft,
        "steps": steps,
        "led": led,
        "shorts_done": len(short_ttft),
        "short_ttft_s": short_ttft,
        "short_ttft_steps": short_steps,
        "cap_steps": cap_steps,
        "capped": at_cap is not None,
        "long_prefilled_at_cap": at_cap,
        "cached_tokens_max": cached,
        "foreign_cores": foreign.since(before),
    }


def _variant(t: dict[str, Any], alone: float | None) -> dict[str, Any]:
    return {
        "long_ttft_s": t["long_ttft_s"],
        "over_alone": ratio(t["long_ttft_s"], alone),
        "steps": t["steps"],
        "led": t["led"],
        "shorts_done": t["shorts_done"],
        "short_ttft_s": summary(t["short_ttft_s"]),
        "short_ttft_steps": summary(t["short_ttft_steps"]),
        "cap_steps": t["cap_steps"],
        "capped": t["capped"],
        "long_prefilled_at_cap": t["long_prefilled_at_cap"],
        "cached_tokens_max": t["cached_tokens_max"],
        "foreign_cores": t["foreign_cores"],
    }


def summarize(
    alone: list[dict[str, Any]], aging: dict[str, Any], no_aging: dict[str, Any], bound: int
) -> dict[str, Any]:
    """
    The part's numbers from its L{trial}s: the long prompt's TTFT in each
    variant over the median alone, steps and steps led, the short
    prompts' TTFT in both floods (what the aging costs them), and whether
    the aging kept its bound (C{bound} steps, L{bound_steps}).
    """
    alone_ttft = summary([t["long_ttft_s"] for t in alone])
    base = alone_ttft["median"]
    out_aging, out_off = _variant(aging, base), _variant(no_aging, base)
    return {
        "alone": {
            "long_ttft_s": alone_ttft,
            "steps": [t["steps"] for t in alone],
            "led": [t["led"] for t in alone],
            "foreign_cores": summary([t["foreign_cores"] for t in alone]),
        },
        "aging": out_aging,
        "no_aging": out_off,
        "bound_steps": bound,
        "within_bound": aging["steps"] <= bound,
        "ratios": {
            "aging_over_alone": out_aging["over_alone"],
            "no_aging_over_alone": out_off["over_alone"],
            "no_aging_over_aging": ratio(no_aging["long_ttft_s"], aging["long_ttft_s"]),
            "short_aging_over_no_aging": ratio(
                out_aging["short_ttft_s"]["median"], out_off["short_ttft_s"]["median"]
            ),
            # Capped: the flood stopped, so the figures without aging are lower bounds.
            "no_aging_is_lower_bound": no_aging["capped"],
        },
        "cached_tokens_max": max(t["cached_tokens_max"] for t in [*alone, aging, no_aging]),
    }


def measure(
    settings: Settings,
    load_engine: Callable[[], Any],
    *,
    sz: Sizes | None = None,
    mark: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """
    The whole part on the engine C{load_engine} returns (loaded, with at
    least L{SLOTS} slots and C{--batch} as its step budget; closed here).
    """
    engine = load_engine()
    aging_steps = engine.prefill_aging
    sz = sz or sizes(settings, aging_steps)
    try:
        prompts = Prompts(settings.seed + 17, _vocab(engine))
        # Not counted: the first steps of a fresh context (buffers, graphs).
        trial(engine, prompts, dataclasses.replace(sz, long_tokens=sz.short_tokens), flood=False)
        mark("prefill fairness: alone")
        alone = [trial(engine, prompts, sz, flood=False)]
        mark("prefill fairness: flood, aging")
        aging = trial(engine, prompts, sz, flood=True)
        mark("prefill fairness: flood, no aging")
        engine.prefill_aging = None
        try:
            no_aging = trial(engine, prompts, sz, flood=True, cap_steps=sz.cap_steps)
        finally:
            engine.prefill_aging = aging_steps
        mark("prefill fairness: alone again")
        alone += [trial(engine, prompts, sz, flood=False) for _ in range(sz.alone_trials - 1)]
    finally:
        engine.close()
    got = summarize(alone, aging, no_aging, sz.bound_steps)
    return {
        **got,
        "slots": SLOTS,
        "aging_steps": aging_steps,
        "sizes": dataclasses.asdict(sz),
        "source": "time.perf_counter() around open() and each step(); StepResult events",
        "where": (
            f"in-process {type(engine).__name__}, {SLOTS} slots, batch {sz.batch}, "
            f"ctx {settings.ctx}, threads {settings.threads}; driven step by step"
        ),
        "notes": [
            f"without aging the flood stopped after {sz.cap_steps} steps ({CAP_FACTOR} x the "
            "aging bound): its long-prompt TTFT and ratios are lower bounds, the wait would "
            "otherwise last as long as the flood"
        ],
    }
