"""
The reactor side of an embedding model: its queue, its batches, and the
cancel path, as L{ds4tw._runtime.worker.Worker} is a chat model's.

A request is a list of inputs (token arrays); L{EmbeddingWorker.submit}
queues it and returns a Deferred of one vector per input. The model
thread runs a loop (L{EmbeddingWorker._steps}) of one
L{ds4tw._engine.embed.Embedder.embed} call per iteration, so that
several models can share one model thread step by step
(L{ds4tw._runtime.modelthread}); each call takes as many waiting inputs
as fit one decode (L{ds4tw._engine.embed.fits}), in FIFO order, across
requests: two requests that arrive while a decode runs go into the next
one together, the way chat sequences share a step. A request with more
inputs than one decode holds spans several.

The queue is shared with the model thread under a lock (the model thread
picks the next batch there the moment it is free; deciding in the
reactor would leave it idle for a round trip per batch). Cancelling a
request's Deferred (Klein does it when the client disconnects):

  - its inputs that have not been taken leave the queue and never run;
  - when every request in the batch on the model thread is cancelled,
    the worker's L{AbortFlag} stops the decode from inside
    (L{ds4tw._engine.interface.Aborted}); the flag is set and cleared
    under the same lock as the batch is picked, so it never stops a batch
    that someone still wants;
  - vectors that still come back for it are dropped.

Loading mirrors the chat worker's: at start, or on demand (the first
request queues and asks for the model through L{EmbeddingWorker.demand}),
with progress and a load that stops when the last waiting client leaves
(L{ds4tw._engine.interface.LoadAborted}); L{EmbeddingWorker.unload} only
while nothing runs or waits. Stopping the service drains like the chat
worker: no new request, the queued and running ones get C{drain_timeout}
seconds, the rest fail with L{JobCancelled} (shutdown), which the API
answers with a 503.

Covered by tests/unit/test_embeddings_api.py (through the route, on
L{ds4tw._engine.embed.ScriptedEmbedder} and SteppedThreads) and
tests/integration/test_embeddings_engine.py (the real model on a real
thread).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._engine.embed import Embedder, fits
from .._engine.interface import Aborted, AbortFlag
from .._types import Stage
from .job import SHUTTING_DOWN, JobCancelled
from .runner import ModelRunner, QueueFull, WorkerThreads

__all__ = ["BatchStats", "EmbeddingWorker"]

_T = TypeVar("_T")

log = Logger()


@dataclass(frozen=True)
class BatchStats:
    """One L{Embedder.embed} call, as /metrics would show it."""

    inputs: int
    tokens: int
    #: Requests the inputs came from.
    requests: int
    seconds: float
    aborted: bool = False


@dataclass(eq=False)
class _Request:
    inputs: list[list[int]]
    deferred: Deferred[list[list[float]]] = field(init=False)
    vectors: list[list[float] | None] = field(init=False)
    #: Inputs handed to the model thread (the lock guards it).
    taken: int = 0
    #: Inputs whose vectors came back.
    done: int = 0
    cancelled: bool = False
    finished: bool = False

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)


#: What the model thread sends back for a batch: the vectors, the failure,
#: or None when the abort flag stopped it.
_Outcome = list[list[float]] | Failure | None


class EmbeddingWorker(ModelRunner):
    """
    Runs one L{Embedder}'s requests, batching inputs across them, with a
    queue of at most C{max_queue} waiting requests.

    @param on_demand: load the model when the first request needs it
        (L{demand} is asked) instead of at start.
    """

    name = "ds4tw-embeddings"

    def __init__(
        self,
        embedder: Embedder,
        threads: WorkerThreads,
        max_queue: int,
        *,
        drain_timeout: float,
        clock: IReactorTime | None = None,
        on_demand: bool = False,
    ) -> None:
        super().__init__(
            embedder,
            threads,
            max_queue,
            drain_timeout=drain_timeout,
            clock=clock,
            on_demand=on_demand,
        )
        self.embedder = embedder
        #: Called in the reactor after every batch.
        self.batch_observers: list[Callable[[BatchStats], None]] = []
        #: Guards L{_queue}, each request's C{taken}, L{_batch} and the
        #: decisions to set or clear L{_abort}.
        self._lock = threading.Lock()
        #: Requests with inputs not yet taken, oldest first.
        self._queue: deque[_Request] = deque()
        #: Every request submitted and not finished (queued or running).
        self._requests: list[_Request] = []
        #: The inputs on the model thread now (request, index), or None.
        self._batch: list[tuple[_Request, int]] | None = None
        self._abort = AbortFlag()
        self._loop: Deferred[None] | None = None

    # -- what the runner asks ------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing runs and nothing waits (nor is a batch on its way back)."""
        return not self._requests and self._loop is None and not self.warming

    @property
    def queue_depth(self) -> int:
        """Requests with inputs still waiting for the model thread."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """The model thread is working on (or about to pick) a batch."""
        return self._loop is not None

    def _waiting(self) -> bool:
        return bool(self._queue)

    def _go(self) -> None:
        self._start_loop()

    def refuse(self, error: Exception) -> None:
        """Fail every request still waiting for the model with C{error}."""
        with self._lock:
            waiting = [r for r in self._queue if r.taken == 0]
            for r in waiting:
                self._queue.remove(r)
        for r in waiting:
            self._finish(r, Failure(error))
        self._check_drained()
        self._check_idle()

    def _cut_off(self) -> bool:
        """The drain timeout: every request left fails as cut off by the shutdown."""
        left = bool(self._requests)
        for r in list(self._requests):
            stage = Stage.QUEUED if r.taken == 0 else Stage.PREFILL
            self._cancel(r, Failure(JobCancelled(stage, SHUTTING_DOWN)))
        return left

    # -- requests ----------------------------------------------------------

    def submit(self, inputs: Sequence[Sequence[int]]) -> Deferred[list[list[float]]]:
        """
        Queue C{inputs} (each 1 to C{embedder.n_ctx} tokens: ValueError
        otherwise); the Deferred fires with one vector per input, in order.
        Raises L{NotReady} or L{QueueFull} synchronously, so that the caller
        can answer with an error before anything runs. Cancelling the
        Deferred stops the request's work (see the module docstring).
        """
        self.check_ready()
        limit = self.embedder.n_ctx
        for i, x in enumerate(inputs):
            if not 0 < len(x) <= limit:
                raise ValueError(f"input {i} has {len(x)} tokens; 1 to {limit} are allowed")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(len(self._queue))
        if not inputs:
            return succeed([])
        request = _Request([list(x) for x in inputs])
        request.deferred = Deferred(lambda _: self._cancel(request, None))
        with self._lock:
            self._queue.append(request)
        self._requests.append(request)
        self.last_used = self.clock.seconds()
        self._want()
        self._start_loop()
        return request.deferred

    def _cancel(self, request: _Request, failure: Failure | None) -> None:
        """
        Stop C{request}'s work (in the reactor): its untaken inputs leave
        the queue, and a batch that holds nobody else's stops. With
        C{failure}, its Deferred fails with it; without, the Deferred is
        being cancelled (it fails with CancelledError by itself).
        """
        if request.finished:
            return
        request.cancelled = True
        with self._lock:
            if request in self._queue:
                self._queue.remove(request)
            batch = self._batch
            if batch is not None and all(r.cancelled for r, _ in batch):
                self._abort.set()
        by_shutdown = failure is not None and failure.check(JobCancelled) is not None
        self._end(request, "cancelled" if by_shutdown else "other")
        if failure is not None:
            request.deferred.errback(failure)
        self._check_drained()
        self._check_idle()

    def _end(self, request: _Request, how: str) -> None:
        """C{request} is over: C{how} is a L{DrainResult} field (drained: answered)."""
        request.finished = True
        self._requests.remove(request)
        self.last_used = self.clock.seconds()
        if self.drain_result is not None:
            setattr(self.drain_result, how, getattr(self.drain_result, how) + 1)

    def _finish(self, request: _Request, outcome: list[list[float]] | Failure) -> None:
        if request.finished:
            return
        if isinstance(outcome, Failure):
            self._end(request, "other")
            request.deferred.errback(outcome)
        else:
            self._end(request, "drained")
            request.deferred.callback(outcome)

    # -- the model thread's loop ---------------------------------------------

    def _start_loop(self) -> None:
        if self._loop is not None or not self._queue or not self.ready:
            return
        if not (self.running or self.draining):
            return
        self._loop = self.threads.run(self._steps())
        self._loop.addBoth(self._loop_ended)

    def _take(self) -> list[tuple[_Request, int]]:
        """In the model thread: the next batch, oldest inputs first."""
        batch: list[tuple[_Request, int]] = []
        tokens = 0
        with self._lock:
            while self._queue:
                request = self._queue[0]
                x = request.inputs[request.taken]
                if not fits(self.embedder, len(batch), tokens, len(x)):
                    break
                batch.append((request, request.taken))
                tokens += len(x)
                request.taken += 1
                if request.taken == len(request.inputs):
                    self._queue.popleft()
            self._batch = batch or None
            # Under the lock that the reactor sets it under: a flag set for
            # the batch before this one can never stop this one.
            self._abort.clear()
        return batch

    def _steps(self) -> Iterator[None]:
        """The model thread's loop: one embed call per iteration."""
        while True:
            batch = self._take()
            if not batch:
                return
            inputs = [r.inputs[i] for r, i in batch]
            started = time.monotonic()
            outcome: _Outcome
            try:
                outcome = self.embedder.embed(inputs, self._abort)
            except Aborted:
                outcome = None
            except Exception:
                outcome = Failure()
            finally:
                with self._lock:
                    self._batch = None
            stats = BatchStats(
                inputs=len(inputs),
                tokens=sum(len(x) for x in inputs),
                requests=len({id(r) for r, _ in batch}),
                seconds=time.monotonic() - started,
                aborted=outcome is None,
            )
            self.threads.to_reactor(self._delivered, batch, outcome, stats)
            yield None

    def _delivered(
        self, batch: list[tuple[_Request, int]], outcome: _Outcome, stats: BatchStats
    ) -> None:
        """A batch came back (in the reactor now)."""
        try:
            if isinstance(outcome, Failure):
                log.failure(
                    "ds4tw: {model}: an embedding batch failed",
                    outcome,
                    model=self.embedder.model_id,
                )
            vectors: list[list[float] | None] = (
                list(outcome) if isinstance(outcome, list) else [None] * len(batch)
            )
            for (request, i), vector in zip(batch, vectors, strict=True):
                if request.finished:
                    continue
                if vector is None:
                    # A failed batch, or (never, by the flag's rule) an
                    # aborted one that held a request still wanted.
                    self._drop(request, outcome if isinstance(outcome, Failure) else None)
                    continue
                request.vectors[i] = vector
                request.done += 1
                if request.done == len(request.inputs):
                    self._finish(request, [v for v in request.vectors if v is not None])
            for observer in self.batch_observers:
                observer(stats)
        finally:
            self._check_drained()

    def _drop(self, request: _Request, failure: Failure | None) -> None:
        with self._lock:
            if request in self._queue:
                self._queue.remove(request)
        error = failure or Failure(RuntimeError("the embedding batch was aborted"))
        self._finish(request, error)

    def _loop_ended(self, result: object) -> None:
        self._loop = None
        if isinstance(result, Failure):
            # A bug in the loop itself: fail whoever it held, never hang them.
            log.failure("ds4tw: the embedding loop failed", result)
            with self._lock:
                self._batch = None
                taken = [r for r in self._requests if r.taken and r not in self._queue]
            for r in taken:
                self._finish(r, result)
        self._start_loop()
        self._check_drained()
        self._check_idle()
