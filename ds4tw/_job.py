"""
One generation request as the reactor and the model thread share it: its
stage, its cancel flag, its listener, and how it ended.

L{Job.cancel} is the start of the cancel path: it sets the flag the model
thread reads between steps and calls the worker back (L{ds4tw._worker}),
which takes a waiting job out of the queue or, when every running request
is cancelled, stops the running step from inside (L{ds4tw._engine.AbortFlag}).

Covered by tests/unit/test_cancel.py, and tests/unit/test_keepalive.py
(the progress a stream reports: queue position, prefill done/total).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ._engine import AbortFlag, SamplingParams
from ._pipeline import OutputPipeline
from ._types import Finish, Output, Stage

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


@dataclass
class _Outcome:
    finish: Finish | None = None
    cancelled_at: Stage | None = None
    #: When the model thread saw the cancel flag and stopped (monotonic).
    stopped_at: float | None = None
    #: The error that ended it in the model thread.
    failure: Failure | None = None
    #: How many other requests shared at least one engine step with it.
    peers: int = 0


class JobListener(Protocol):
    """What a job tells its consumer, always in the reactor thread."""

    def stage_changed(self, stage: Stage) -> None: ...

    def output(self, event: Output) -> None: ...


class _NullListener:
    def stage_changed(self, stage: Stage) -> None:
        pass

    def output(self, event: Output) -> None:
        pass


class Job:
    """
    One generation request. Created and consumed in the reactor; the
    worker thread only reads L{cancelled} and reports through
    L{WorkerThreads.to_reactor}.

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
        #: Token bytes to output events; used only by the model thread.
        self.pipeline = pipeline or OutputPipeline(params.stop)
        self.listener: JobListener = listener or _NullListener()
        self.label = label
        self.stage = Stage.QUEUED
        #: Read by the worker thread before every engine step.
        self.cancelled = False
        #: The same for native code (set by L{cancel}, only read
        #: elsewhere); the worker's step flag is what the engine watches.
        self.abort = AbortFlag()
        self.cancel_reason = ""
        # Cancelling the Deferred (Klein does, on disconnect) cancels the job.
        self.deferred: Deferred[Finish] = Deferred(lambda _: self.cancel("request cancelled"))
        self._on_cancel: Callable[[Job], None] | None = None
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.cancel_requested_at: float | None = None
        #: Prompt tokens in the KV cache so far, of L{prefill_total}
        #: (reused ones included), as the last engine step reported.
        self.prefill_done = 0
        self.prefill_total = len(prompt)
        #: Set by the worker that queues the job (L{Worker.queue_position}).
        self._locate: Callable[[Job], int | None] | None = None
        #: Written by the worker thread, read in the reactor once it ends.
        self._outcome = _Outcome()

    def cancel(self, reason: str = "client disconnected") -> None:
        """Stop this job's work at the next check. Idempotent."""
        if self.cancelled or self.stage is Stage.DONE:
            return
        self.cancel_requested_at = time.monotonic()
        self.cancelled = True
        self.cancel_reason = reason
        self.abort.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    @property
    def queue_position(self) -> int | None:
        """
        Where the job waits for a slot: 1 is next. None once it has a slot
        (or before it was submitted).
        """
        if self.stage is not Stage.QUEUED or self._locate is None:
            return None
        return self._locate(self)

    @property
    def peers(self) -> int:
        """How many other requests shared at least one engine step with this one."""
        return self._outcome.peers

    @property
    def cancel_latency(self) -> float | None:
        """Seconds from L{cancel} to the work actually stopping."""
        if self.cancel_requested_at is None or self._outcome.stopped_at is None:
            return None
        return max(0.0, self._outcome.stopped_at - self.cancel_requested_at)

    # Called in the reactor by the worker.
    def _set_stage(self, stage: Stage) -> None:
        if self.stage is Stage.DONE or stage is self.stage:
            return
        self.stage = stage
        self.listener.stage_changed(stage)

    def _prefilled(self, done: int, total: int) -> None:
        self.prefill_done, self.prefill_total = done, total

    def _outputs(self, events: list[Output]) -> None:
        if not self.cancelled:
            for event in events:
                self.listener.output(event)

    # The Deferred may already have fired: cancelling it (Klein does, on
    # disconnect) errbacks it with CancelledError before the model thread
    # has even seen the flag.
    def _succeed(self, finish: Finish) -> None:
        self._set_stage(Stage.DONE)
        if not self.deferred.called:
            self.deferred.callback(finish)

    def _fail(self, failure: Failure) -> None:
        self._set_stage(Stage.DONE)
        if not self.deferred.called:
            self.deferred.errback(failure)

    def _fail_cancelled(self, stage: Stage, reason: str) -> None:
        self._outcome.cancelled_at = stage
        # No stage_changed: a cancelled job has nobody left to tell.
        self.stage = Stage.DONE
        if not self.deferred.called:
            self.deferred.errback(Failure(JobCancelled(stage, reason)))
