"""
One generation request, in two parts: the L{Job} its consumer holds in
the reactor (its listener, its Deferred, its cancel) and the L{Work} the
worker and the model thread hold (what to compute, and the one record of
how far it got and how it ended).

L{Job.cancel} is the start of the cancel path: it sets the flag the model
thread reads between steps and calls the worker back (L{ds4tw._runtime.worker}),
which takes a waiting job out of the queue or, when every running request
is cancelled, stops the running step from inside (L{ds4tw._engine.interface.AbortFlag}).

Covered by tests/unit/test_cancel.py, tests/unit/test_scheduler.py, and
tests/unit/test_keepalive.py (the stage and progress a stream reports:
queue position, prefill done/total).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .._engine.interface import SamplingParams
from .._formats.pipeline import OutputPipeline
from .._types import Finish, Output, Stage

#: The cancel reason of every job the shutdown stops (L{Worker.stopService}).
SHUTTING_DOWN = "server shutting down"


class JobCancelled(Exception):
    """The job was cancelled; C{stage} is where its work stopped."""

    def __init__(self, stage: Stage, reason: str) -> None:
        super().__init__(f"cancelled during {stage.value}: {reason}")
        self.stage = stage
        self.reason = reason

    @property
    def by_shutdown(self) -> bool:
        """
        The server stopped it at the drain timeout: somebody may still be
        listening (unlike a client disconnect) and is owed an error.
        """
        return self.reason == SHUTTING_DOWN


class JobListener(Protocol):
    """What a job tells its consumer, always in the reactor thread."""

    def stage_changed(self, stage: Stage) -> None:
        """The work reached C{stage} (prefill, then decode; never told of its end)."""

    def output(self, event: Output) -> None: ...


class _NullListener:
    def stage_changed(self, stage: Stage) -> None:
        pass

    def output(self, event: Output) -> None:
        pass


class Work:
    """
    A job as the worker and the model thread see it: the request to
    compute, and the record of what became of it. Its stage is kept here
    and nowhere else (L{Job.stage} reads it).

    Who writes the record: the model thread, from the moment it takes the
    work from the worker's inbox until it hands it back (the batch loop's
    C{ended}, called in the reactor); the worker, for work the model
    thread never took (cancelled in the queue or the inbox) or lost (a
    failed batch loop). The reactor may read L{stage} and the prefill
    counts at any moment: each is one reference store, so it sees the old
    value or the new one, and a slot-holding job says C{prefill} as soon
    as its prefill starts rather than when its first batch comes back.
    The rest it reads after the handback, which the C{callFromThread}
    orders after every write.

    The methods are called in the reactor only.
    """

    def __init__(self, job: Job) -> None:
        #: The consumer's side, for the worker (its observers, its slots).
        self.job = job
        self.prompt = job.prompt
        self.params = job.params
        #: Token bytes to output events; used only by the model thread.
        self.pipeline = job.pipeline
        self.submitted_at = job.submitted_at
        #: Queued until the model thread opens a sequence for it, prefill
        #: until its prompt is in the KV cache, then decode. Never "done":
        #: once it ends, this is where it stopped.
        self.stage = Stage.QUEUED
        #: When the model thread opened its sequence (monotonic).
        self.started_at: float | None = None
        #: Prompt tokens in the KV cache so far, of L{prefill_total}
        #: (reused ones included), as the last engine step reported.
        self.prefill_done = 0
        self.prefill_total = len(job.prompt)
        # How it ended: a finish, a failure, or neither when its cancel
        # flag stopped it (then stopped_at is set).
        self.finish: Finish | None = None
        self.failure: Failure | None = None
        #: When its cancel flag was seen and its work stopped (monotonic).
        self.stopped_at: float | None = None
        #: How many other requests shared at least one engine step with it.
        self.peers = 0
        #: Set by the worker that queues it: its cancel callback and its
        #: place in the queue (L{Worker.queue_position}).
        self.on_cancel: Callable[[Job], None] | None = None
        self.locate: Callable[[Job], int | None] | None = None
        #: Set by an on-demand worker: how far its model's load is (0..1),
        #: or None once it is loaded.
        self.loading: Callable[[], float | None] | None = None
        #: L{end} ran: the job's Deferred has its result.
        self.ended = False

    @property
    def cancelled(self) -> bool:
        """Read by the model thread before every engine step."""
        return self.job.cancelled

    def tell_stage(self, stage: Stage) -> None:
        """Tell the listener the work reached C{stage} (a delivery from the model thread)."""
        if not self.ended:
            self.job.listener.stage_changed(stage)

    def tell_outputs(self, events: list[Output]) -> None:
        """Pass output events to the listener, unless the job was cancelled meanwhile."""
        job = self.job
        if not job.cancelled:
            for event in events:
                job.listener.output(event)

    def end(self) -> Finish | Failure:
        """
        The work is over and handed back: fire the job's Deferred with how
        it ended, and return that for the worker's observers.
        """
        self.ended = True
        outcome: Finish | Failure
        if self.failure is not None:
            outcome = self.failure
        elif self.finish is not None:
            outcome = self.finish
        else:
            outcome = Failure(JobCancelled(self.stage, self.job.cancel_reason))
        # The Deferred may already have fired: cancelling it (Klein does,
        # on disconnect) errbacks it with CancelledError before the model
        # thread has even seen the flag.
        deferred = self.job.deferred
        if not deferred.called:
            if isinstance(outcome, Finish):
                deferred.callback(outcome)
            else:
                deferred.errback(outcome)
        return outcome


class Job:
    """
    One generation request, as its consumer sees it in the reactor: made
    there, listened to, cancelled. What the worker and the model thread
    use of it is L{work}.

    L{deferred} fires with a L{Finish}, or fails with L{JobCancelled} or
    the engine's exception.
    """

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        listener: JobListener | None = None,
        label: str = "",
        pipeline: OutputPipeline | None = None,
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.pipeline = pipeline or OutputPipeline(params.stop)
        self.listener: JobListener = listener or _NullListener()
        self.label = label
        #: Read by the model thread before every engine step.
        self.cancelled = False
        self.cancel_reason = ""
        self.cancel_requested_at: float | None = None
        # Cancelling the Deferred (Klein does, on disconnect) cancels the job.
        self.deferred: Deferred[Finish] = Deferred(lambda _: self.cancel("request cancelled"))
        self.submitted_at = time.monotonic()
        #: The worker's and the model thread's side: the stage, the
        #: progress and the outcome, kept once.
        self.work = Work(self)

    def cancel(self, reason: str = "client disconnected") -> None:
        """Stop this job's work at the next check. Idempotent."""
        if self.cancelled or self.work.ended:
            return
        self.cancel_requested_at = time.monotonic()
        self.cancelled = True
        self.cancel_reason = reason
        if self.work.on_cancel is not None:
            self.work.on_cancel(self)

    @property
    def stage(self) -> Stage:
        """
        Where its work is: C{loading} while it waits for its model to
        load, C{queued} while it waits for a slot, C{prefill} from the
        moment the model thread starts its prompt, C{decode} once the
        prompt is in the KV cache. Never C{done}: after the end, where it
        stopped. What the stream's keepalive names as it is.
        """
        stage = self.work.stage
        loading = self.work.loading
        if stage is Stage.QUEUED and loading is not None and loading() is not None:
            return Stage.LOADING
        return stage

    @property
    def load_percent(self) -> int:
        """How much of its model's load is done, while it waits for it."""
        loading = self.work.loading
        fraction = loading() if loading is not None else None
        return 100 if fraction is None else int(fraction * 100)

    @property
    def queue_position(self) -> int | None:
        """
        Where the job waits for a slot: 1 is next. None once it has a slot
        (or before it was submitted).
        """
        locate = self.work.locate
        if self.work.stage is not Stage.QUEUED or locate is None:
            return None
        return locate(self)

    @property
    def prefill_done(self) -> int:
        """Prompt tokens in the KV cache so far (reused ones included)."""
        return self.work.prefill_done

    @property
    def prefill_total(self) -> int:
        """All of the prompt's tokens, as the engine counts them."""
        return self.work.prefill_total

    @property
    def started_at(self) -> float | None:
        """When the model thread began its prompt (monotonic), None before."""
        return self.work.started_at

    @property
    def peers(self) -> int:
        """How many other requests shared at least one engine step with this one."""
        return self.work.peers

    @property
    def cancel_latency(self) -> float | None:
        """Seconds from L{cancel} to the work actually stopping."""
        stopped_at = self.work.stopped_at
        if self.cancel_requested_at is None or stopped_at is None:
            return None
        return max(0.0, stopped_at - self.cancel_requested_at)
