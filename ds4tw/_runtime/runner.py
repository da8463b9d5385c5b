"""
L{ModelRunner}: what a chat model's L{ds4tw._runtime.worker.Worker} and
an embedding model's L{ds4tw._runtime.embedding.EmbeddingWorker} share,
whatever their queues hold: the model's load and unload on the model
thread, whether requests can be admitted, and the shutdown drain.

  - B{load}: at start, or on demand (the first request queues and asks
    the fleet through L{ModelRunner.demand}); llama.cpp's progress is kept
    for the stream's C{: loading N%}, and when the last waiting client
    leaves, the progress callback says stop (L{LoadAborted}). An
    on-demand load that fails fails the requests waiting for it, and the
    next request tries again.
  - B{unload}: only while nothing runs or waits, so that it never cuts a
    request off.
  - B{loss}: when the model itself goes away under the running requests
    (L{BackendLost}: its process died, an RPC worker was lost), they fail,
    so do the queued ones, admission says why (503), and the model is
    loaded again after L{ModelRunner.RELOAD_FIRST_S}, the wait doubling
    after each failed reload up to L{ModelRunner.RELOAD_MAX_S} (a model
    loaded on demand just waits for the next request).
    An engine that can be probed (L{Probed}: RPC workers) is asked every
    C{probe_interval} seconds while loaded and idle, so that a worker that
    dies between requests turns C{/health} 503 then, not at the next
    request.
  - B{drain}: from C{stopService}, no new request; the running and queued
    ones get C{drain_timeout} seconds, the rest is cut off; then the model
    is closed and the model thread released.

Covered by tests/unit/test_fleet.py, tests/unit/test_shutdown.py,
tests/unit/test_backend_lost.py and tests/unit/test_embeddings_api.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._engine.interface import BackendLost, LoadAborted, LoadProgress, Probed

__all__ = [
    "DrainResult",
    "ModelRunner",
    "ModelState",
    "NotReady",
    "QueueFull",
    "ShuttingDown",
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
    The thread boundary. L{ds4tw._runtime.modelthread.ModelThread} is the
    real one; tests use L{ds4tw.testing.SteppedThreads}.
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


class Loadable(Protocol):
    """A model as a runner loads it: an engine or an embedder."""

    model_id: str

    def load(self, progress: LoadProgress | None = None) -> None: ...

    def close(self) -> None: ...


@dataclass
class DrainResult:
    """How the shutdown drain went (L{ModelRunner.stopService})."""

    #: Requests, running or queued when it began, that finished normally.
    drained: int = 0
    #: Requests still running or queued at the drain timeout, cut off then.
    cancelled: int = 0
    #: Requests that ended otherwise meanwhile (their client left, or an error).
    other: int = 0
    #: Seconds from the SIGTERM (L{ModelRunner.stopService}) to an idle runner.
    seconds: float = 0.0
    timed_out: bool = False


class ModelRunner(Service):
    """
    One model's lifecycle. A subclass owns its queue and says what is
    waiting (L{_waiting}), what is in hand (L{idle}), how to move the
    queue once the model is in (L{_go}), how to fail what waits
    (L{refuse}) and how to cut everything off at the drain timeout
    (L{_cut_off}).
    """

    #: Seconds from a loss (L{lost}) to the first reload, and the longest
    #: wait between two failed reloads (the wait doubles each time).
    RELOAD_FIRST_S = 1.0
    RELOAD_MAX_S = 30.0

    def __init__(
        self,
        model: Loadable,
        threads: WorkerThreads,
        max_queue: int,
        *,
        drain_timeout: float,
        clock: IReactorTime | None,
        on_demand: bool,
    ) -> None:
        self._model = model
        self.threads = threads
        self.max_queue = max_queue
        self.drain_timeout = drain_timeout
        self.on_demand = on_demand
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.clock: IReactorTime = clock
        self.state = ModelState.UNLOADED
        #: The load's progress (0..1) as llama.cpp reports it, while loading.
        self.load_progress = 0.0
        #: Seconds the last load took (0 before any).
        self.load_seconds = 0.0
        self.load_error: Failure | None = None
        #: Read by the load's progress callback in the model thread: stop.
        self._stop_load = False
        #: Loads and unloads done (for /metrics).
        self.loads = 0
        self.unloads = 0
        #: The clock's time of the last request submitted or ended: the
        #: least recently used idle model is the first unloaded.
        self.last_used = self.clock.seconds()
        #: Called (in the reactor) when a request waits for a model not loaded.
        self.demand: Callable[[Any], None] | None = None
        #: Called when nothing runs or waits any more (the model may go).
        self.idle_observers: list[Callable[[Any], None]] = []
        #: Fires at the first load (or fails, for a model loaded at start).
        self.loaded: Deferred[None] = Deferred()
        #: Set from the moment L{stopService} begins.
        self.draining = False
        self.drain_result: DrainResult | None = None
        self._drained: Deferred[None] | None = None
        self._drain_timer: IDelayedCall | None = None
        self._drain_started = 0.0
        #: Callers waiting for a load with no request of their own (L{warm}).
        self._warming: list[Deferred[None]] = []
        #: Times the model was lost under its requests (L{lost}), why the
        #: last time, and the wait before the next reload while it is out.
        self.losses = 0
        self.lost_reason: str | None = None
        self._reload_wait: float | None = None
        self._reload_call: IDelayedCall | None = None
        #: The idle probes of a loaded model (L{Probed}), and one in flight.
        self._probes: LoopingCall | None = None
        self._probing = False

    # -- what a subclass says ------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing runs and nothing waits."""
        raise NotImplementedError

    @property
    def queue_depth(self) -> int:
        """Requests waiting in the queue."""
        raise NotImplementedError

    def _waiting(self) -> bool:
        """Requests wait in the queue."""
        raise NotImplementedError

    def _go(self) -> None:
        """The model is in: move the queue."""
        raise NotImplementedError

    def refuse(self, error: Exception) -> None:
        """Fail every request waiting for the model with C{error} (it will not load)."""
        raise NotImplementedError

    def _cut_off(self) -> bool:
        """The drain timeout: cut off whatever is left; whether anything was."""
        raise NotImplementedError

    # -- admission -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The model is loaded and runs requests."""
        return self.state is ModelState.READY

    def check_ready(self) -> None:
        """Raise L{NotReady}, saying why, unless requests can be admitted."""
        if self._reload_wait is not None and not self.ready:
            raise NotReady(f"the model was lost ({self.lost_reason}) and is being reloaded")
        if self.load_error is not None and not self.on_demand:
            raise NotReady("the model failed to load")
        if self.draining or not self.running:
            raise ShuttingDown("the server is shutting down")
        if not self.ready and not self.on_demand:
            raise NotReady("the model is still loading")

    def offload(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        C{f(*args)} on a helper thread (templating, tokenizing: work that
        needs the model's vocabulary but not the model thread), once
        requests can be admitted; raises L{NotReady} (saying why) at once
        otherwise.
        """
        self.check_ready()
        return self.threads.offload(f, *args)

    def warm(self) -> Deferred[None]:
        """
        Load the model with no request waiting for it (Ollama's load
        request): fires once it is in, or fails with L{NotReady} saying why
        not. While it waits it counts as a request waiting (the model is
        not idle); cancelling it is a client leaving.
        """
        self.last_used = self.clock.seconds()
        if self.state is ModelState.READY:
            return succeed(None)
        self.check_ready()

        def left(d: Deferred[None]) -> None:
            if d in self._warming:
                self._warming.remove(d)
                self._check_idle()

        d: Deferred[None] = Deferred(left)
        self._warming.append(d)
        self._want()
        return d

    @property
    def warming(self) -> bool:
        """Someone waits for L{warm}."""
        return bool(self._warming)

    def fail_warming(self, error: Exception) -> None:
        """Fail every L{warm} caller with C{error} (the model will not load)."""
        waiting, self._warming = self._warming, []
        for d in waiting:
            d.errback(error)

    def loading(self) -> float | None:
        """
        While requests here wait for the model itself (its load, or an
        unload before it): how far the load is (0..1). None once loaded.
        """
        if self.state is ModelState.READY:
            return None
        return self.load_progress if self.state is ModelState.LOADING else 0.0

    # -- load and unload -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.threads.start()
        if not self.on_demand:
            self.load()

    def load(self) -> Deferred[None]:
        """
        Load the model in the model thread. Fires when it is loaded (the
        queue then moves), or with the failure.
        """
        assert self.state is ModelState.UNLOADED, self.state
        self.state = ModelState.LOADING
        self.load_progress = 0.0
        self._stop_load = False
        self.load_error = None
        started = self.clock.seconds()
        d = self.threads.call(self._model.load, self._progress)

        def loaded(_: object) -> None:
            self.state = ModelState.READY
            self.loads += 1
            if self._reload_wait is not None:
                log.info("ds4tw: {model}: reloaded after its loss", model=self._model.model_id)
                self._reload_wait = None
            self._start_probes()
            self.load_seconds = self.clock.seconds() - started
            if not self.loaded.called:
                self.loaded.callback(None)
            self._go()
            waiting, self._warming = self._warming, []
            for w in waiting:
                w.callback(None)
            self._check_idle()

        def failed(f: Failure) -> None:
            self.state = ModelState.UNLOADED
            model = self._model.model_id
            if f.check(LoadAborted):
                log.info("ds4tw: {model}: load stopped: nobody waits for it any more", model=model)
                self._check_idle()
                return
            self.load_error = f
            log.failure("ds4tw: {model}: the model failed to load", f, model=model)
            self.fail_warming(NotReady(f"the model failed to load: {f.getErrorMessage()}"))
            if self._reload_wait is not None:
                self._reload_later(min(self._reload_wait * 2, self.RELOAD_MAX_S))
                return
            if not self.on_demand:
                self.loaded.errback(f)
                return
            self.refuse(NotReady(f"the model failed to load: {f.getErrorMessage()}"))

        d.addCallbacks(loaded, failed)
        return d

    def lost(self, failure: Failure) -> None:
        """
        The model itself is gone (L{BackendLost}, in the reactor, before
        the running requests' ends): fail what waits, say why at
        admission (503), and load it again with back-off.
        """
        if self.state is not ModelState.READY:
            return
        self._stop_probes()
        self.state = ModelState.UNLOADED
        self.losses += 1
        self.lost_reason = failure.getErrorMessage()
        self.load_error = failure
        error = NotReady(f"the model was lost ({self.lost_reason})")
        self.fail_warming(error)
        self.refuse(error)
        if self.on_demand:
            # The next request asks for it again.
            return
        self._reload_later(self.RELOAD_FIRST_S)

    def _start_probes(self) -> None:
        model = self._model
        if self._probes is not None or not isinstance(model, Probed) or model.probe_interval <= 0:
            return
        self._probes = LoopingCall(self._probe)
        self._probes.clock = self.clock
        self._probes.start(model.probe_interval, now=False)

    def _stop_probes(self) -> None:
        if self._probes is not None and self._probes.running:
            self._probes.stop()
        self._probes = None

    def _probe(self) -> None:
        """Ask the idle model's engine whether its backend is still there."""
        if self.state is not ModelState.READY or not self.idle or self._probing:
            return  # a running step finds a lost backend by itself
        model = self._model
        assert isinstance(model, Probed)
        self._probing = True

        def verdict(why: str | None) -> None:
            self._probing = False
            if why is None or self.state is not ModelState.READY:
                return
            log.error("ds4tw: {model}: lost while idle: {why}", model=self._model.model_id, why=why)
            self.lost(Failure(BackendLost(why)))
            # Its process (holding the other workers) goes before the reload.
            self.threads.call(model.close).addErrback(
                lambda f: log.failure("ds4tw: closing the lost model failed", f)
            )

        def failed(f: Failure) -> None:
            self._probing = False
            log.failure("ds4tw: {model}: the probe failed", f, model=self._model.model_id)

        self.threads.offload(model.probe).addCallbacks(verdict, failed)

    def _reload_later(self, wait: float) -> None:
        self._reload_wait = wait
        log.info("ds4tw: {model}: reloading in {wait:.0f} s", model=self._model.model_id, wait=wait)
        self._reload_call = self.clock.callLater(wait, self._reload)

    def _reload(self) -> None:
        self._reload_call = None
        if self.draining or not self.running or self.state is not ModelState.UNLOADED:
            return
        self.load()

    @property
    def reload_in(self) -> float | None:
        """Seconds until the next reload of a lost model (None: none due)."""
        call = self._reload_call
        if call is None or not call.active():
            return None
        return max(0.0, call.getTime() - self.clock.seconds())

    def _progress(self, fraction: float) -> bool:
        # The model thread, inside llama.cpp's load: plain writes and reads.
        self.load_progress = fraction
        return not self._stop_load

    def unload(self) -> Deferred[None]:
        """
        Close the model (its memory goes back; saved prompt prefixes go to
        the disk tier), only while nothing runs or waits: an unload never
        cuts a request off. A request that arrives meanwhile waits for the
        next load.
        """
        assert self.state is ModelState.READY and self.idle, (self.state, self.idle)
        self._stop_probes()
        self.state = ModelState.UNLOADING
        d = self.threads.call(self._model.close)

        def unloaded(result: object) -> object:
            self.state = ModelState.UNLOADED
            self.unloads += 1
            self._want()
            return result

        return d.addBoth(unloaded)

    def _want(self) -> None:
        waiting = self._waiting() or bool(self._warming)
        if self.demand is not None and self.state is ModelState.UNLOADED and waiting:
            self.demand(self)

    def _check_idle(self) -> None:
        if not self.idle:
            return
        if self.state is ModelState.LOADING:
            # The last client waiting for this load left: stop it.
            self._stop_load = True
        for observer in list(self.idle_observers):
            observer(self)

    # -- the drain ---------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """
        Drain (no new request; the running and queued ones get
        C{drain_timeout} seconds, the rest is cut off), then close the
        model and release the model thread. L{drain_result} says how it
        went.
        """
        super().stopService()
        self.draining = True
        self._stop_probes()
        if self._reload_call is not None and self._reload_call.active():
            self._reload_call.cancel()
        self._reload_call = None
        self.fail_warming(ShuttingDown("the server is shutting down"))
        self.drain_result = DrainResult()
        self._drain_started = self.clock.seconds()
        pending: Deferred[None] = Deferred()
        self._drained = pending
        if self.drain_timeout > 0:
            self._drain_timer = self.clock.callLater(self.drain_timeout, self._drain_expired)
        else:
            self._drain_expired()
        self._check_drained()

        def close(_: object) -> Deferred[None]:
            return self.threads.call(self._model.close)

        def stop(_: object) -> None:
            self.threads.stop()

        pending.addBoth(close)
        pending.addBoth(stop)
        return pending

    def _drain_expired(self) -> None:
        self._drain_timer = None
        left = self._cut_off()
        if self.drain_result is not None:
            self.drain_result.timed_out = left

    def _check_drained(self) -> None:
        if self._drained is None or not self.idle:
            return
        drained, self._drained = self._drained, None
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        assert self.drain_result is not None
        self.drain_result.seconds = self.clock.seconds() - self._drain_started
        drained.callback(None)
