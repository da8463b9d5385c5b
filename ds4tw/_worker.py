"""
The single-model scheduler and the cancel path.

One model means one worker thread (a llama context is not thread-safe),
fed from a bounded FIFO of L{Job}s that lives in the reactor. A job moves
through the stages C{queued -> prefill -> decode}; L{Job.cancel} at any
stage stops its work at once:

  - queued: the job leaves the queue and never reaches the engine;
  - prefill: the worker stops before the next prefill batch;
  - decode: the worker stops before the next token.

The worker thread pulls engine events one at a time and checks the job's
cancel flag before every pull (L{_run_job}); that loop is the only place
cancellation is enforced. Events reach the reactor through
L{WorkerThreads.to_reactor}.

The thread boundary itself is an interface (L{WorkerThreads}) so that tests
can drive the worker one engine event at a time (L{ds4tw.testing.SteppedThreads}).

Covered by tests/unit/test_cancel.py, tests/unit/test_shutdown.py and
tests/unit/test_openai_routes.py (a model still loading).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._engine import Aborted, AbortFlag, Engine, PrefillProgress, SamplingParams, Token
from ._pipeline import OutputPipeline
from ._types import Finish, Output, Stage, Timings, Usage

_T = TypeVar("_T")

log = Logger()


class QueueFull(Exception):
    """The bounded queue has no room; the client should retry later."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"server is busy: {depth} requests are already waiting")
        self.depth = depth


class NotReady(Exception):
    """The model is still loading (or failed to load)."""


#: The cancel reason of every job the shutdown stops (L{Worker.stopService}).
SHUTTING_DOWN = "server shutting down"


class ShuttingDown(NotReady):
    """The server is draining for shutdown and admits no new work."""


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
        #: The same, for native code inside a step (the engine's abort
        #: callback): set by L{cancel} in the reactor, only read elsewhere.
        self.abort = AbortFlag()
        self.cancel_reason = ""
        # Cancelling the Deferred (Klein does, on disconnect) cancels the job.
        self.deferred: Deferred[Finish] = Deferred(lambda _: self.cancel("request cancelled"))
        self._on_cancel: Callable[[Job], None] | None = None
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.cancel_requested_at: float | None = None
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


class WorkerThreads(Protocol):
    """
    The thread boundary. L{PoolThreads} is the real one; tests use
    L{ds4tw.testing.SteppedThreads}.
    """

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def call(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run C{f} in the model thread; the result fires in the reactor."""

    def run(self, steps: Iterator[None]) -> Deferred[None]:
        """Exhaust C{steps} in the model thread; fires in the reactor."""

    def offload(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run CPU work that needs no model context off the reactor thread."""

    def to_reactor(self, f: Callable[..., object], *args: Any) -> None:
        """From the model thread: call C{f} in the reactor thread."""


class PoolThreads:
    """One dedicated model thread plus the reactor's shared pool for offload."""

    def __init__(self, reactor: Any, name: str = "ds4tw-model") -> None:
        from twisted.python.threadpool import ThreadPool

        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=name)

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def call(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def run(self, steps: Iterator[None]) -> Deferred[None]:
        return self.call(_exhaust, steps)

    def offload(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def to_reactor(self, f: Callable[..., object], *args: Any) -> None:
        self._reactor.callFromThread(f, *args)


def _exhaust(steps: Iterator[None]) -> None:
    for _ in steps:
        pass


@dataclass
class DrainResult:
    """How the shutdown drain went (L{Worker.stopService})."""

    #: Jobs, running or queued when it began, that finished normally.
    drained: int = 0
    #: Jobs still running or queued at the drain timeout, cancelled then.
    cancelled: int = 0
    #: Jobs that ended otherwise meanwhile (their client left, or an error).
    other: int = 0
    #: Seconds from the SIGTERM (L{Worker.stopService}) to an idle worker.
    seconds: float = 0.0
    timed_out: bool = False


class Worker(Service):
    """
    Loads the engine at start-up, then runs jobs one at a time in FIFO
    order from a queue of at most C{max_queue} waiting jobs.

    Stopping it drains: no new job is admitted (L{ShuttingDown}), the
    running job and the queued ones keep going for up to
    C{drain_timeout} seconds of C{clock}, and whatever is left then is
    cancelled with the reason L{SHUTTING_DOWN} (so that its consumer can
    tell its client, unlike a disconnect). Queued jobs are drained too:
    the load balancer has already stopped sending, the queue is bounded,
    and a client that waited in it is better served by its answer within
    the window than by an immediate 503 that sends it to the back of
    another server's queue; the timeout still bounds the whole shutdown.
    """

    name = "ds4tw-worker"

    def __init__(
        self,
        engine: Engine,
        threads: WorkerThreads,
        max_queue: int = 128,
        *,
        drain_timeout: float = 0.0,
        clock: IReactorTime | None = None,
    ) -> None:
        self.engine = engine
        self.threads = threads
        self.max_queue = max_queue
        self.drain_timeout = drain_timeout
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock: IReactorTime = clock
        self.ready = False
        #: Set from the moment L{stopService} begins.
        self.draining = False
        self.drain_result: DrainResult | None = None
        self._drained: Deferred[None] | None = None
        self._drain_timer: IDelayedCall | None = None
        self._drain_started = 0.0
        self.load_error: Failure | None = None
        self._queue: deque[Job] = deque()
        self._current: Job | None = None
        self._current_done: Deferred[None] | None = None
        self.loaded: Deferred[None] = Deferred()
        #: Called in the reactor after every job ends (for metrics and logs).
        self.observers: list[Callable[[Job, Finish | Failure], None]] = []

    # -- service ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.threads.start()
        d = self.threads.call(self.engine.load)

        def loaded(_: object) -> None:
            self.ready = True
            self.loaded.callback(None)

        def failed(f: Failure) -> None:
            self.load_error = f
            log.failure("ds4tw: the model failed to load", f)
            self.loaded.errback(f)

        d.addCallbacks(loaded, failed)

    def stopService(self) -> Deferred[None]:
        """
        Drain (see the class docstring), then close the engine and stop
        the model thread. L{drain_result} says how it went.
        """
        super().stopService()
        self.draining = True
        self.drain_result = DrainResult()
        self._drain_started = self.clock.seconds()
        self.observers.append(self._count_drained)
        pending: Deferred[None] = Deferred()
        self._drained = pending
        if self.drain_timeout > 0:
            self._drain_timer = self.clock.callLater(self.drain_timeout, self._drain_expired)
        else:
            self._drain_expired()
        self._check_drained()

        def close(_: object) -> Deferred[None]:
            return self.threads.call(self.engine.close)

        def stop(_: object) -> None:
            self.threads.stop()

        pending.addBoth(close)
        pending.addBoth(stop)
        return pending

    def _count_drained(self, job: Job, outcome: Finish | Failure) -> None:
        result = self.drain_result
        assert result is not None
        if isinstance(outcome, Finish):
            result.drained += 1
        elif isinstance(outcome.value, JobCancelled) and outcome.value.by_shutdown:
            result.cancelled += 1
        else:
            result.other += 1

    def _drain_expired(self) -> None:
        """The drain timeout: cancel the queued jobs, then the running one."""
        self._drain_timer = None
        if self.drain_result is not None:
            self.drain_result.timed_out = bool(self._queue or self._current)
        for job in list(self._queue):
            job.cancel(SHUTTING_DOWN)
        if self._current is not None:
            # Stopped by the model thread at its next check, like a disconnect.
            self._current.cancel(SHUTTING_DOWN)

    def _check_drained(self) -> None:
        if self._drained is None or self._current is not None or self._queue:
            return
        drained, self._drained = self._drained, None
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        assert self.drain_result is not None
        self.drain_result.seconds = self.clock.seconds() - self._drain_started
        drained.callback(None)

    # -- queue -----------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._current is not None

    def check_ready(self) -> None:
        """Raise L{NotReady}, saying why, unless jobs can be admitted."""
        if self.load_error is not None:
            raise NotReady("the model failed to load")
        if self.draining or not self.running:
            raise ShuttingDown("the server is shutting down")
        if not self.ready:
            raise NotReady("the model is still loading")

    def submit(self, job: Job) -> Deferred[Finish]:
        """
        Admit C{job}. Raises L{NotReady} or L{QueueFull} synchronously, so
        that the caller can answer with an error before sending anything.
        """
        self.check_ready()
        if self._current is not None and len(self._queue) >= self.max_queue:
            raise QueueFull(len(self._queue))
        job._on_cancel = self._cancelled
        self._queue.append(job)
        self._pump()
        return job.deferred

    def _cancelled(self, job: Job) -> None:
        if job is not self._current:
            # Still waiting: it leaves the queue and never costs compute.
            try:
                self._queue.remove(job)
            except ValueError:
                return
            self._drop_queued(job)
            self._check_drained()
        # A running job is stopped by the worker thread at its next check.

    def _drop_queued(self, job: Job) -> None:
        job._outcome.stopped_at = time.monotonic()
        job._fail_cancelled(Stage.QUEUED, job.cancel_reason)
        self._notify(job, Failure(JobCancelled(Stage.QUEUED, job.cancel_reason)))

    def _pump(self) -> None:
        if self._current is not None or not self._queue:
            return
        if not self.running and not self.draining:
            return
        job = self._queue.popleft()
        self._current = job
        job.started_at = time.monotonic()
        d = self.threads.run(_run_job(self.engine, self.threads, job))
        self._current_done = d.addBoth(self._finished, job)

    def _finished(self, result: object, job: Job) -> None:
        self._current = None
        self._current_done = None
        outcome: Finish | Failure
        try:
            if isinstance(result, Failure):
                outcome = result
                job._fail(result)
            elif job._outcome.cancelled_at is not None:
                stage = job._outcome.cancelled_at
                outcome = Failure(JobCancelled(stage, job.cancel_reason))
                job._fail_cancelled(stage, job.cancel_reason)
            else:
                assert job._outcome.finish is not None
                outcome = job._outcome.finish
                job._succeed(outcome)
        finally:
            # Whatever a consumer's callback did, the queue moves on.
            self._notify(job, outcome)
            self._pump()
            self._check_drained()

    def _notify(self, job: Job, outcome: Finish | Failure) -> None:
        for observer in self.observers:
            observer(job, outcome)


def _run_job(engine: Engine, threads: WorkerThreads, job: Job) -> Iterator[None]:
    """
    The model-thread side of one job: pull engine events one at a time,
    checking the cancel flag before each, and hand text to the reactor.
    The engine also gets the job's L{AbortFlag}, and an L{Aborted} it
    raises from inside a step counts as the cancel seen at that stage.
    Each yield is one engine step, so L{ds4tw.testing.SteppedThreads} can
    stop the world between any two.
    """
    outcome = job._outcome
    started = time.monotonic()
    timings = Timings(queued=started - job.submitted_at)
    if job.cancelled:
        outcome.cancelled_at = Stage.QUEUED
        return
    threads.to_reactor(job._set_stage, Stage.PREFILL)
    stage = Stage.PREFILL
    usage = Usage(prompt_tokens=len(job.prompt))
    pipeline = job.pipeline
    gen = engine.generate(job.prompt, job.params, job.abort)
    reason: str = "stop"
    stop_sequence: str | None = None
    decode_started = started
    try:
        while True:
            if job.cancelled:
                outcome.cancelled_at = stage
                outcome.stopped_at = time.monotonic()
                return
            try:
                event = next(gen)
            except StopIteration as done:
                reason = done.value
                break
            except Aborted:
                # The engine stopped inside this step: a cancel seen here.
                outcome.cancelled_at = stage
                outcome.stopped_at = time.monotonic()
                return
            if isinstance(event, PrefillProgress):
                usage.cached_tokens = event.cached
                if event.done >= event.total and stage is Stage.PREFILL:
                    stage = Stage.DECODE
                    decode_started = time.monotonic()
                    timings.prefill = decode_started - started
                    threads.to_reactor(job._set_stage, Stage.DECODE)
            else:
                assert isinstance(event, Token)
                usage.completion_tokens += 1
                thinking = pipeline.in_reasoning
                fed = pipeline.feed(event)
                # Tags count as reasoning: the token was inside the block
                # before or after it.
                if thinking or pipeline.in_reasoning:
                    usage.reasoning_tokens += 1
                if fed.outputs:
                    threads.to_reactor(job._outputs, fed.outputs)
                if fed.stop is not None:
                    reason, stop_sequence = "stop", fed.stop
                    break
                if fed.call_done:
                    break  # the one call this request allowed is complete
            yield
        tail = pipeline.finish(stopped=stop_sequence is not None)
        if tail:
            threads.to_reactor(job._outputs, tail)
    finally:
        gen.close()
    if reason == "stop" and pipeline.calls:
        reason = "tool_calls"
    timings.decode = time.monotonic() - decode_started
    outcome.finish = Finish(reason, usage, stop_sequence, timings)
