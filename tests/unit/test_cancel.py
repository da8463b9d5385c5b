"""
The cancel promise: a client that goes away stops its work at once, at
every stage, streaming or not, and the model moves on to the next job.

The scripted engine records every unit of work it does (engine.computed),
so these tests assert exactly how much ran after the disconnect: none.

A disconnect while queued, prefilling or decoding, streaming or not, is
tested for every dialect in tests/unit/test_dialects.py; this file keeps
what lies below the dialects (the worker's queue, the abort flag).

Caveat: SteppedThreads makes "at once" mean "at the next engine step";
the real-model test in tests/integration measures it on a real thread.
"""

from __future__ import annotations

import pytest

from ds4tw import JobCancelled, SamplingParams, Stage
from ds4tw._runtime.worker import Job, QueueFull

from .conftest import make_rig


def metric(rig, line: str) -> bool:  # type: ignore[no-untyped-def]
    return line in rig.http.get("/metrics").body.decode()


def test_disconnect_of_a_queued_non_streaming_request() -> None:
    rig = make_rig(["a b c", "never", "third"])
    rig.chat()
    rig.threads.step()
    queued = rig.chat()
    assert rig.server.worker.queue_depth == 1
    queued.disconnect()
    assert rig.server.worker.queue_depth == 0
    rig.threads.run_until_idle()
    assert len(rig.engine.calls) == 1


def test_next_job_starts_as_soon_as_the_cancelled_one_stops() -> None:
    rig = make_rig(["a b c d e f", "second reply"])
    first = rig.stream()
    second = rig.stream()
    rig.threads.step(3)
    first.disconnect()
    rig.threads.step()  # first stops
    assert rig.threads.busy  # ...and second is already on the model thread
    rig.threads.run_until_idle()
    text = "".join(
        c["choices"][0]["delta"].get("content", "") for c in second.data() if c != "[DONE]"
    )
    assert text == "second reply"


def test_cancel_is_idempotent_and_late_cancel_is_harmless() -> None:
    rig = make_rig(["ok"])
    ex = rig.stream()
    rig.threads.run_until_idle()
    assert ex.finished
    ex.disconnect()  # after the end: nothing to cancel
    assert metric(rig, 'ds4tw_jobs_total{outcome="done"} 1.0')
    assert not metric(rig, 'ds4tw_jobs_total{outcome="cancelled"}')


def test_queue_is_bounded() -> None:
    rig = make_rig(max_queue=1)
    rig.stream()
    rig.threads.step()
    rig.stream()
    full = rig.stream()
    assert full.status == 503
    assert full.header("retry-after") == "1"
    assert full.json()["error"]["code"] == "server_busy"
    with pytest.raises(QueueFull):
        rig.server.worker.submit(Job([1, 2], SamplingParams()))


def test_shutdown_cancels_everything_and_stops_the_thread() -> None:
    rig = make_rig(["a b c d e f"], drain_timeout=0)  # no drain: tests/unit/test_shutdown.py
    running = Job([1, 2, 3], SamplingParams())
    queued = Job([1, 2, 3], SamplingParams())
    rig.server.worker.submit(running)
    rig.server.worker.submit(queued)
    rig.threads.step(2)
    failures: list[JobCancelled] = []
    queued.deferred.addErrback(lambda f: failures.append(f.value))
    running.deferred.addErrback(lambda f: failures.append(f.value))
    stopped = rig.server.stopService()
    rig.threads.step()
    assert [f.stage for f in failures] == [Stage.QUEUED, Stage.DECODE]
    assert stopped.called and rig.threads.stopped and rig.engine.closed
    # Both are counted and logged, the queued one included.
    assert metric(rig, 'ds4tw_cancelled_jobs_total{stage="queued"} 1.0')
    assert metric(rig, 'ds4tw_cancelled_jobs_total{stage="decode"} 1.0')


def _disconnect_inside(rig, ex, step: tuple[str, int]) -> None:  # type: ignore[no-untyped-def]
    """Hang up while the engine computes C{step} (as the reactor can, beside a real engine)."""

    def hook(now: tuple[str, int]) -> None:
        if now == step:
            ex.disconnect()

    rig.engine.step_hook = hook


def test_an_abort_inside_a_prefill_batch_is_a_cancel_at_prefill() -> None:
    rig = make_rig(["never sent", "next"], n_batch=8)
    ex = rig.stream("a prompt that needs many prefill batches to get through")
    _disconnect_inside(rig, ex, ("prefill", 16))
    rig.threads.step(2)
    # The second batch was stopped inside: never computed...
    assert rig.engine.computed == [("prefill", 8), ("closed", None)]
    # ...and no step after it: the loop's next turn finds nothing to run.
    rig.threads.step()
    assert rig.engine.computed == [("prefill", 8), ("closed", None)]
    assert len(rig.engine.steps) == 1
    assert not rig.threads.busy
    assert metric(rig, 'ds4tw_cancelled_jobs_total{stage="prefill"} 1.0')
    assert metric(rig, 'ds4tw_cancel_latency_seconds_count{stage="prefill"} 1.0')
    assert not metric(rig, 'ds4tw_jobs_total{outcome="error"}')
    rig.engine.step_hook = None
    nxt = rig.stream()
    rig.threads.run_until_idle()
    assert nxt.finished and nxt.data()[-1] == "[DONE]"


def test_an_abort_inside_a_decode_step_is_a_cancel_at_decode() -> None:
    rig = make_rig(["a b c d e f g h i j"])
    ex = rig.stream()
    _disconnect_inside(rig, ex, ("token", 3))
    rig.threads.run_until_idle()
    tokens = [i for kind, i in rig.engine.computed if kind == "token"]
    assert tokens == [0, 1, 2]
    assert rig.engine.computed[-1] == ("closed", None)
    assert metric(rig, 'ds4tw_cancelled_jobs_total{stage="decode"} 1.0')
    assert not metric(rig, 'ds4tw_jobs_total{outcome="error"}')


def test_an_abort_of_a_job_object_is_recorded_at_its_stage() -> None:
    rig = make_rig(["a b c d e f"], n_batch=4)
    job = Job([1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    rig.engine.step_hook = lambda step: job.cancel() if step == ("prefill", 8) else None
    failures: list[JobCancelled] = []
    job.deferred.addErrback(lambda f: failures.append(f.value))
    rig.server.worker.submit(job)
    rig.threads.run_until_idle()
    assert [(f.stage, f.reason) for f in failures] == [(Stage.PREFILL, "client disconnected")]
    assert job.stage is Stage.PREFILL  # where it stopped
    assert job.cancel_latency is not None
    assert rig.engine.computed == [("prefill", 4), ("closed", None)]
