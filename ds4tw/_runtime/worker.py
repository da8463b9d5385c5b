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

The model's load, unload and shutdown drain are L{ModelRunner}'s
(L{ds4tw._runtime.runner}), shared with the embedding worker. The thread
boundary itself is an interface (L{WorkerThreads}) so that tests can
drive the model thread one engine step at a time
(L{ds4tw.testing.SteppedThreads}).

Covered by tests/unit/test_cancel.py, tests/unit/test_scheduler.py,
tests/unit/test_shutdown.py, tests/unit/test_openai_routes.py (a model
still loading) and tests/unit/test_keepalive.py (queue positions).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._engine.interface import AbortFlag, Engine
from .._types import Finish
from .job import SHUTTING_DOWN, Job, JobCancelled, JobListener, Work
from .runner import (
    DrainResult,
    ModelRunner,
    ModelState,
    NotReady,
    QueueFull,
    ShuttingDown,
    WorkerThreads,
)
from .scheduler import BatchLoop, StepStats

__all__ = [
    "SHUTTING_DOWN",
    "DrainResult",
    "Job",
    "JobCancelled",
    "JobListener",
    "ModelState",
    "NotReady",
    "QueueFull",
    "ShuttingDown",
    "StepStats",
    "Worker",
    "WorkerThreads",
]

_T = TypeVar("_T")

log = Logger()


class Worker(ModelRunner):
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
        super().__init__(
            engine,
            threads,
            max_queue,
            drain_timeout=drain_timeout,
            clock=clock,
            on_demand=on_demand,
        )
        self.engine = engine
        self._queue: deque[Job] = deque()
        #: Jobs admitted to the model thread and not yet ended.
        self._running: list[Job] = []
        #: Admitted jobs' work the batch loop has not taken yet (shared with it).
        self._inbox: deque[Work] = deque()
        #: Watched by the engine inside a step; set only while every
        #: running job is cancelled, so it never stops anyone's work.
        self._step_abort = AbortFlag()
        self._loop: Deferred[None] | None = None
        #: Called in the reactor after every job ends (for metrics and logs).
        self.observers: list[Callable[[Job, Finish | Failure], None]] = []
        #: Called in the reactor after every engine step.
        self.step_observers: list[Callable[[StepStats], None]] = []

    # -- what the runner asks ------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing runs and nothing waits (nor does anyone wait for a load)."""
        return not (self._running or self._queue or self.warming)

    def _waiting(self) -> bool:
        return bool(self._queue)

    def _go(self) -> None:
        self._pump()

    def refuse(self, error: Exception) -> None:
        """Fail every job waiting for the model with C{error} (it will not load)."""
        for job in list(self._queue):
            self._queue.remove(job)
            job.work.failure = Failure(error)
            job.work.stopped_at = time.monotonic()
            self._notify(job, job.work.end())
        self._check_drained()
        self._check_idle()

    def _cut_off(self) -> bool:
        """The drain timeout: cancel the queued jobs, then the running ones."""
        left = bool(self._queue or self._running)
        for job in list(self._queue):
            job.cancel(SHUTTING_DOWN)
        for job in list(self._running):
            # Stopped by the model thread at its next check, like a disconnect.
            job.cancel(SHUTTING_DOWN)
        return left

    def stopService(self) -> Deferred[None]:
        """Drain (see the class docstring); L{drain_result} counts how each job ended."""
        self.observers.append(self._count_drained)
        return super().stopService()

    def _count_drained(self, job: Job, outcome: Finish | Failure) -> None:
        result = self.drain_result
        assert result is not None
        if isinstance(outcome, Finish):
            result.drained += 1
        elif isinstance(outcome.value, JobCancelled) and outcome.value.by_shutdown:
            result.cancelled += 1
        else:
            result.other += 1

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
            self.lost,
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
