"""
The reactor side of the model: its queue, its slots, and the cancel path.

One model means one model thread (a llama context is not thread-safe, and
a second thread calling ggml makes libgomp throttle decode about 3x:
docs/performance.md), running the batch loop of L{ds4tw._runtime.scheduler}. The
worker admits up to C{engine.slots} jobs at once into that loop; more
wait in a bounded FIFO here in the reactor. A job moves through the
stages C{queued -> prefill -> decode}; L{Job.cancel} at any stage stops
its work at once:

  - queued (here or in the loop's inbox): the job leaves and never
    reaches the engine;
  - running: its sequence leaves before the next step (the others in the
    batch go on untouched); and when every running job is cancelled,
    the worker's step flag stops the step in progress from inside
    (L{ds4tw._engine.interface.AbortFlag}).

The thread boundary itself is an interface (L{WorkerThreads}) so that tests
can drive the model thread one engine step at a time
(L{ds4tw.testing.SteppedThreads}).

Covered by tests/unit/test_cancel.py, tests/unit/test_scheduler.py,
tests/unit/test_shutdown.py, tests/unit/test_openai_routes.py (a model
still loading) and tests/unit/test_keepalive.py (queue positions).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._engine.interface import AbortFlag, Engine, LoadAborted
from .._types import Finish
from .job import SHUTTING_DOWN, Job, JobCancelled, JobListener, Work
from .scheduler import BatchLoop, StepStats

__all__ = [
    "SHUTTING_DOWN",
    "DrainResult",
    "Job",
    "JobCancelled",
    "JobListener",
    "ModelState",
    "NotReady",
    "PoolThreads",
    "QueueFull",
    "ShuttingDown",
    "StepStats",
    "Worker",
    "WorkerThreads",
]

_T = TypeVar("_T")

log = Logger()


class QueueFull(Exception):
    """The bounded queue has no room; the client should retry later."""

    def __init__(self, depth: int) -> None:
        super().__init__(f"server is busy: {depth} requests are already waiting")
        self.depth = depth


class NotReady(Exception):
    """The model is still loading (or failed to load)."""


class ShuttingDown(NotReady):
    """The server is draining for shutdown and admits no new work."""


class ModelState(StrEnum):
    """Where a worker's model is: on disk, on its way in or out, or loaded."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"


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
    Loads the engine at start-up, then runs up to C{engine.slots} jobs at
    once, taking waiting ones in FIFO order from a queue of at most
    C{max_queue}.

    With C{on_demand}, the model is not loaded at start: the first job
    queues and asks for it (L{demand}, which L{ds4tw._runtime.fleet.Fleet}
    answers with L{load} once the memory budget has room), and L{unload}
    gives the memory back while nothing runs or waits. A job waiting for
    the load is a queued job like any other (its stream says
    C{: loading}); when the last waiting job's client leaves, the load
    itself is stopped (L{LoadAborted}).

    Stopping it drains: no new job is admitted (L{ShuttingDown}), the
    running jobs and the queued ones keep going for up to
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
        max_queue: int,
        *,
        drain_timeout: float,
        clock: IReactorTime | None = None,
        on_demand: bool = False,
    ) -> None:
        self.engine = engine
        self.on_demand = on_demand
        self.threads = threads
        self.max_queue = max_queue
        self.drain_timeout = drain_timeout
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock: IReactorTime = clock
        self.state = ModelState.UNLOADED
        #: The load's progress (0..1) as llama.cpp reports it, while loading.
        self.load_progress = 0.0
        #: Read by the load's progress callback in the model thread: stop.
        self._stop_load = False
        #: Loads and unloads done (for /metrics).
        self.loads = 0
        self.unloads = 0
        #: The clock's time of the last job submitted or ended: the least
        #: recently used idle model is the first unloaded.
        self.last_used = self.clock.seconds()
        #: Called (in the reactor) when a job waits for a model not loaded.
        self.demand: Callable[[Worker], None] | None = None
        #: Called when nothing runs or waits any more (the model may go).
        self.idle_observers: list[Callable[[Worker], None]] = []
        #: Set from the moment L{stopService} begins.
        self.draining = False
        self.drain_result: DrainResult | None = None
        self._drained: Deferred[None] | None = None
        self._drain_timer: IDelayedCall | None = None
        self._drain_started = 0.0
        self.load_error: Failure | None = None
        self._queue: deque[Job] = deque()
        #: Jobs admitted to the model thread and not yet ended.
        self._running: list[Job] = []
        #: Admitted jobs' work the batch loop has not taken yet (shared with it).
        self._inbox: deque[Work] = deque()
        #: Watched by the engine inside a step; set only while every
        #: running job is cancelled, so it never stops anyone's work.
        self._step_abort = AbortFlag()
        self._loop: Deferred[None] | None = None
        self.loaded: Deferred[None] = Deferred()
        #: Called in the reactor after every job ends (for metrics and logs).
        self.observers: list[Callable[[Job, Finish | Failure], None]] = []
        #: Called in the reactor after every engine step.
        self.step_observers: list[Callable[[StepStats], None]] = []

    # -- service ---------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The model is loaded and runs jobs."""
        return self.state is ModelState.READY

    @property
    def idle(self) -> bool:
        """Nothing runs and nothing waits."""
        return not (self._running or self._queue)

    def startService(self) -> None:
        super().startService()
        self.threads.start()
        if not self.on_demand:
            self.load()

    def load(self) -> Deferred[None]:
        """
        Load the model in the model thread. Fires when it is loaded (the
        queue then moves), or with the failure; an on-demand model that
        failed is tried again by the next job, and the jobs waiting for
        this load fail with L{NotReady} saying why.
        """
        assert self.state is ModelState.UNLOADED, self.state
        self.state = ModelState.LOADING
        self.load_progress = 0.0
        self._stop_load = False
        self.load_error = None
        started = self.clock.seconds()
        d = self.threads.call(self.engine.load, self._progress)

        def loaded(_: object) -> None:
            self.state = ModelState.READY
            self.loads += 1
            self.load_seconds = self.clock.seconds() - started
            if not self.loaded.called:
                self.loaded.callback(None)
            self._pump()
            self._check_idle()

        def failed(f: Failure) -> None:
            self.state = ModelState.UNLOADED
            if f.check(LoadAborted):
                log.info(
                    "ds4tw: {model}: load stopped: nobody waits for it any more",
                    model=self.engine.model_id,
                )
                self._check_idle()
                return
            self.load_error = f
            log.failure("ds4tw: {model}: the model failed to load", f, model=self.engine.model_id)
            if not self.on_demand:
                self.loaded.errback(f)
                return
            self.refuse(NotReady(f"the model failed to load: {f.getErrorMessage()}"))

        d.addCallbacks(loaded, failed)
        return d

    #: Seconds the last load took (0 before any).
    load_seconds = 0.0

    def _progress(self, fraction: float) -> bool:
        # The model thread, inside llama.cpp's load: plain writes and reads.
        self.load_progress = fraction
        return not self._stop_load

    def unload(self) -> Deferred[None]:
        """
        Close the model (its memory goes back; saved prompt prefixes go to
        the disk tier), only while nothing runs or waits: an unload never
        cuts a request off. A job that arrives meanwhile waits for the
        next load.
        """
        assert self.state is ModelState.READY and self.idle, (self.state, self.idle)
        self.state = ModelState.UNLOADING
        d = self.threads.call(self.engine.close)

        def unloaded(result: object) -> object:
            self.state = ModelState.UNLOADED
            self.unloads += 1
            if self._queue:
                self._want()
            return result

        return d.addBoth(unloaded)

    def refuse(self, error: Exception) -> None:
        """Fail every job waiting for the model with C{error} (it will not load)."""
        for job in list(self._queue):
            self._queue.remove(job)
            job.work.failure = Failure(error)
            job.work.stopped_at = time.monotonic()
            self._notify(job, job.work.end())
        self._check_drained()
        self._check_idle()

    def _want(self) -> None:
        if self.demand is not None and self.state is ModelState.UNLOADED and self._queue:
            self.demand(self)

    def _check_idle(self) -> None:
        if self.idle:
            if self.state is ModelState.LOADING:
                # The last client waiting for this load left: stop it.
                self._stop_load = True
            for observer in list(self.idle_observers):
                observer(self)

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
        """The drain timeout: cancel the queued jobs, then the running ones."""
        self._drain_timer = None
        if self.drain_result is not None:
            self.drain_result.timed_out = bool(self._queue or self._running)
        for job in list(self._queue):
            job.cancel(SHUTTING_DOWN)
        for job in list(self._running):
            # Stopped by the model thread at its next check, like a disconnect.
            job.cancel(SHUTTING_DOWN)

    def _check_drained(self) -> None:
        if self._drained is None or self._running or self._queue:
            return
        drained, self._drained = self._drained, None
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        assert self.drain_result is not None
        self.drain_result.seconds = self.clock.seconds() - self._drain_started
        drained.callback(None)

    # -- queue and slots ---------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def slots(self) -> int:
        return self.engine.slots

    @property
    def slots_busy(self) -> int:
        return len(self._running)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def queue_position(self, job: Job) -> int | None:
        """
        C{job}'s place in the queue (1: next to get a slot), or None when it
        is not waiting there. A linear search, which is C code over at most
        C{max_queue} entries: cheap beside the per-second poll that asks.
        """
        try:
            return self._queue.index(job) + 1
        except ValueError:
            return None

    def check_ready(self) -> None:
        """Raise L{NotReady}, saying why, unless jobs can be admitted."""
        if self.load_error is not None and not self.on_demand:
            raise NotReady("the model failed to load")
        if self.draining or not self.running:
            raise ShuttingDown("the server is shutting down")
        if not self.ready and not self.on_demand:
            raise NotReady("the model is still loading")

    def offload(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        C{f(*args)} on a helper thread (templating, tokenizing: work that
        needs the loaded model but not the model thread), once jobs can be
        admitted; raises L{NotReady} (saying why) at once otherwise.
        """
        self.check_ready()
        return self.threads.offload(f, *args)

    def submit(self, job: Job) -> Deferred[Finish]:
        """
        Admit C{job}. Raises L{NotReady} or L{QueueFull} synchronously, so
        that the caller can answer with an error before sending anything.
        """
        self.check_ready()
        waits = not self.ready or len(self._running) >= self.slots
        if waits and len(self._queue) >= self.max_queue:
            raise QueueFull(len(self._queue))
        job.work.on_cancel = self._cancelled
        job.work.locate = self.queue_position
        job.work.loading = self.loading
        self._queue.append(job)
        self.last_used = self.clock.seconds()
        self._want()
        self._pump()
        return job.deferred

    def loading(self) -> float | None:
        """
        While jobs here wait for the model itself (its load, or an unload
        before it): how far the load is (0..1). None once it is loaded.
        """
        if self.state is ModelState.READY:
            return None
        return self.load_progress if self.state is ModelState.LOADING else 0.0

    def _cancelled(self, job: Job) -> None:
        if job in self._queue:
            # Still waiting: it leaves the queue and never costs compute.
            self._queue.remove(job)
            self._drop_queued(job)
            self._check_drained()
            self._check_idle()
            return
        if job not in self._running:
            return
        try:
            # Admitted but not yet taken by the model thread.
            self._inbox.remove(job.work)
        except ValueError:
            pass
        else:
            self._running.remove(job)
            self._drop_queued(job)
            self._pump()
            self._check_drained()
            self._check_idle()
            return
        # Running: its sequence leaves before the next step. When nobody
        # else in the step still wants it, stop the step itself.
        if all(j.cancelled for j in self._running):
            self._step_abort.set()

    def _drop_queued(self, job: Job) -> None:
        # Never seen by the model thread: its stage is still queued.
        job.work.stopped_at = time.monotonic()
        self._notify(job, job.work.end())

    def _pump(self) -> None:
        """Admit waiting jobs into free slots and make sure the loop runs."""
        if (not self.running and not self.draining) or not self.ready:
            return
        while self._queue and len(self._running) < self.slots:
            job = self._queue.popleft()
            self._running.append(job)
            # Before the job is visible to the model thread: the flag is
            # set only while every running job is cancelled.
            self._step_abort.clear()
            self._inbox.append(job.work)
        self._start_loop()

    def _start_loop(self) -> None:
        if self._loop is not None or not self._inbox:
            return
        loop = BatchLoop(
            self.engine,
            self.threads.to_reactor,
            self._inbox,
            self._step_abort,
            self._ended,
            self._stepped,
        )
        self._loop = self.threads.run(loop.steps())
        self._loop.addBoth(self._loop_ended)

    def _loop_ended(self, result: object) -> None:
        self._loop = None
        if isinstance(result, Failure):
            # A bug in the loop itself: fail whoever it held, never hang them.
            log.failure("ds4tw: the batch loop failed", result)
            for job in list(self._running):
                if job.work not in self._inbox:
                    job.work.failure = result
                    self._ended(job.work)
        # A job admitted while the loop was on its way out.
        self._start_loop()

    def _ended(self, work: Work) -> None:
        """A job's work ended in the model thread (in the reactor now)."""
        job = work.job
        if job in self._running:
            self._running.remove(job)
        self.last_used = self.clock.seconds()
        try:
            self._notify(job, work.end())
        finally:
            # Whatever an observer did, the queue moves on.
            self._pump()
            self._check_drained()
            self._check_idle()

    def _stepped(self, stats: StepStats) -> None:
        for observer in self.step_observers:
            observer(stats)

    def _notify(self, job: Job, outcome: Finish | Failure) -> None:
        for observer in self.observers:
            observer(job, outcome)
