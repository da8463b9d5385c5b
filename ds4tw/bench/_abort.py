"""
The abort check's cost: decode throughput of one in-process
L{ds4tw.LlamaEngine} with llama.cpp's abort callback installed (libc
C{strlen} on the job's L{ds4tw.AbortFlag}, ggml calls it before
every graph node) against the same engine with no callback, trials
interleaved in the same run, each with a busy Python thread beside the
decode (as the reactor is beside the model thread: a check that took the
GIL would show here, DESIGN.md measured 32.8 -> 5.2 tok/s for a ctypes
callback).

Covered by tests/unit/test_bench.py (the summary) and used by
C{ds4tw-bench --only cancel}.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from ._settings import Settings


def _busy(stop: threading.Event) -> None:
    """Pure Python work that wants the GIL all the time."""
    n = 0
    while not stop.is_set():
        n += sum(range(200))


def _decode_tps(engine: Any, prompt: list[int], tokens: int) -> float:
    from ds4tw import AbortFlag, SamplingParams, Token

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    times = []
    for ev in engine.generate(prompt, params, AbortFlag()):
        if isinstance(ev, Token):
            times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def summarize(with_cb: list[float], without: list[float]) -> dict[str, Any]:
    """Medians and the median of per-pair ratios (with / without)."""
    pairs = [a / b for a, b in zip(with_cb, without, strict=True) if b > 0]
    return {
        "with_callback_tps": with_cb,
        "without_callback_tps": without,
        "with_callback_median_tps": statistics.median(with_cb) if with_cb else None,
        "without_callback_median_tps": statistics.median(without) if without else None,
        "ratio": statistics.median(pairs) if pairs else None,
    }


def _pairs(
    engine: Any, prompt: list[int], tokens: int, trials: int
) -> tuple[list[float], list[float]]:
    with_cb: list[float] = []
    without: list[float] = []
    for i in range(trials):
        # Alternate which goes first, so drift hits both alike.
        order = (True, False) if i % 2 == 0 else (False, True)
        for on in order:
            # Every trial after the warm-up reuses the prompt's cells from the
            # slot: the same work every time.
            engine.abort_in_step = on
            (with_cb if on else without).append(_decode_tps(engine, prompt, tokens))
    engine.abort_in_step = True
    return with_cb, without


def measure(settings: Settings, load_engine: Callable[[], Any], trials: int = 7) -> dict[str, Any]:
    """
    Two phases, each of interleaved pairs: alone (the check's own cost:
    the headline C{ratio}), and beside a busy Python thread (C{busy}: a
    check that took the GIL would collapse here, as a ctypes callback
    does, 32.8 -> 5.2 tok/s in DESIGN.md; the GIL contention itself makes
    these numbers noisy, so they are evidence, not the target).
    """
    engine = load_engine()
    try:
        from ds4tw import abort_callback

        installed = abort_callback() is not None
        prompt = engine.tokenize("Write a long story about a lighthouse keeper.")
        tokens = 64 if settings.quick else 128
        _decode_tps(engine, prompt, 8)  # warm-up
        alone = _pairs(engine, prompt, tokens, trials)
        stop = threading.Event()
        busy = threading.Thread(target=_busy, args=(stop,), daemon=True)
        busy.start()
        try:
            beside = _pairs(engine, prompt, tokens, trials)
        finally:
            stop.set()
            busy.join()
        return {
            **summarize(*alone),
            "busy": summarize(*beside),
            "callback": "libc strlen on the job's AbortFlag" if installed else None,
            "tokens_per_trial": tokens,
            "where": "in-process LlamaEngine.generate(), greedy, trials interleaved",
        }
    finally:
        engine.close()
