"""
The one log line each generation job leaves when it ends: its outcome
(finished, cancelled and where, or failed), its tokens and its timings,
under the label that names its request (L{ds4tw._api.ids.job_label}). A
worker observer, like the metrics.

Covered by tests/unit/test_app.py and tests/unit/test_shutdown.py.
"""

from __future__ import annotations

import time

from twisted.logger import Logger
from twisted.python.failure import Failure

from .._types import Finish
from .worker import Job, JobCancelled, NotReady

log = Logger()


def log_job(job: Job, outcome: Finish | Failure) -> None:
    """The one log line per generation job: outcome, tokens, timings."""
    if isinstance(outcome, Finish):
        u, t = outcome.usage, outcome.timings
        rate = u.completion_tokens / t.decode if t.decode > 0 else 0.0
        log.info(
            "{label} done: finish={reason} prompt={prompt} cached={cached}{cached_from} "
            "completion={completion} queued={queued:.3f}s prefill={prefill:.3f}s "
            "decode={decode:.3f}s ({rate:.1f} tok/s) shared steps with {peers} other requests",
            label=job.label,
            reason=outcome.reason,
            prompt=u.prompt_tokens,
            cached=u.cached_tokens,
            cached_from=f" (from {u.cached_from})" if u.cached_from else "",
            completion=u.completion_tokens,
            queued=t.queued,
            prefill=t.prefill,
            decode=t.decode,
            rate=rate,
            peers=job.peers,
        )
    elif isinstance(outcome.value, JobCancelled):
        latency = job.cancel_latency
        log.info(
            "{label} cancelled at {stage} ({reason}); stopped {latency} after the cancel, "
            "{age:.3f}s after submission; shared steps with {peers} other requests",
            label=job.label,
            stage=outcome.value.stage.value,
            reason=outcome.value.reason,
            latency="-" if latency is None else f"{latency * 1000:.2f}ms",
            age=time.monotonic() - job.submitted_at,
            peers=job.peers,
        )
    elif isinstance(outcome.value, NotReady):
        # Its model did not load, or cannot fit the budget: said where that
        # happened (the worker, the fleet); here only that it was not served.
        log.warn("{label} not served: {reason}", label=job.label, reason=outcome.value)
    else:
        log.failure("{label} error", outcome, label=job.label)
