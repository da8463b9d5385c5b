"""
The models a server runs, loaded on demand within a memory budget.

Each model has a worker (L{ds4tw._runtime.worker.Worker}: its queue, its
slots, its cancel path); every worker steps on one shared model thread
(L{ds4tw._runtime.modelthread}). The fleet decides which models are in
memory:

  - a model loads when a request for it arrives (its worker's
    L{Worker.demand}); the request waits in that model's queue, as a
    queued request (its stream says C{: loading}), and the load stops if
    every request waiting for it leaves first;
  - what loaded models take (weights, KV cache, compute buffers and the
    prompt cache's memory budget, as llama.cpp reports them once loaded;
    estimated from the GGUF before) stays within C{budget} bytes: to
    make room, the least recently used idle models are unloaded;
  - a model is unloaded only while nothing runs or waits on it, so a
    swap never cuts a request off. Requests for a model that cannot fit
    yet wait in its (bounded) queue, and models are loaded in the order
    their first waiting request arrived: a big model is not passed over
    forever by small ones;
  - a model nobody used for C{idle_unload} seconds is unloaded.

Covered by tests/unit/test_fleet.py and tests/integration/test_models.py.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._engine.interface import Engine
from .worker import ModelState, NotReady, Worker, WorkerThreads

__all__ = ["Fleet", "Model", "ModelTooLarge", "is_glob"]

log = Logger()

_MIB = 2**20


class ModelTooLarge(NotReady):
    """The model alone needs more memory than the budget allows."""


@dataclass(eq=False)
class Model:
    """
    One model of a server: its engine, the names that reach it, and how
    the fleet treats it. The fleet gives it its L{worker}.

    @ivar name: what C{/v1/models} lists (default: the engine's model id).
    @ivar aliases: other names requests may use: exact names, or glob
        patterns (C{claude-haiku-*}, fnmatch syntax).
    @ivar kind: C{chat}, or C{embedding} for a model that only embeds.
    @ivar memory_bytes: what the budget counts for it instead of what
        the engine reports (a models file's C{memory_mb}).
    @ivar idle_unload: seconds unused before it is unloaded (None: the
        fleet's setting).
    @ivar reasoning_parser: overrides the server's C{--reasoning-parser}.
    @ivar tool_call_parser: overrides the server's C{--tool-call-parser}.
    """

    engine: Engine
    name: str = ""
    aliases: tuple[str, ...] = ()
    kind: Literal["chat", "embedding"] = "chat"
    memory_bytes: int | None = None
    idle_unload: float | None = None
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    #: Unloads by why: C{evicted} (room for another), C{idle}.
    unloads: dict[str, int] = field(default_factory=dict)
    _worker: Worker | None = field(default=None, init=False, repr=False)
    _prepared: _Once | None = field(default=None, init=False, repr=False)
    _idle_timer: IDelayedCall | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.engine.model_id

    @property
    def worker(self) -> Worker:
        assert self._worker is not None, "not in a fleet yet"
        return self._worker

    def memory(self) -> int:
        """Bytes the budget counts for this model (measured once loaded)."""
        if self.memory_bytes is not None:
            return self.memory_bytes
        return self.engine.memory().total

    def _preparation(self, offload: Callable[..., Deferred[Any]]) -> _Once:
        if self._prepared is None:
            self._prepared = _Once(offload(self.engine.prepare))
        return self._prepared


class Fleet(MultiService):
    """
    The models, by name and alias, and when each is loaded.

    @param models: in order: the first one that matches a name by glob
        serves it.
    @param default: the model for a request naming none, or a name that
        matches nothing (None: a 404).
    @param budget: bytes the loaded models may take (None: no limit).
    @param idle_unload: seconds unused before a model is unloaded (None:
        never).
    """

    def __init__(
        self,
        models: Sequence[Model],
        *,
        threads: WorkerThreads,
        clock: IReactorTime,
        max_queue: int,
        drain_timeout: float,
        on_demand: bool = True,
        default: str | None = None,
        budget: int | None = None,
        idle_unload: float | None = None,
    ) -> None:
        super().__init__()
        if not models:
            raise ValueError("a fleet needs at least one model")
        self.models: dict[str, Model] = {}
        for model in models:
            if model.name in self.models:
                raise ValueError(f"two models are named {model.name!r}")
            self.models[model.name] = model
        if default is not None and default not in self.models:
            raise ValueError(f"the default model {default!r} is not one of the models")
        self.default = default
        self.budget = budget
        self.idle_unload = idle_unload
        self.clock = clock
        self._offload = threads.offload
        #: Models whose requests wait for a load, in the order they asked.
        self._wanting: list[Model] = []
        for model in models:
            worker = model._worker = Worker(
                model.engine,
                threads,
                max_queue,
                drain_timeout=drain_timeout,
                clock=clock,
                on_demand=on_demand,
            )
            if len(models) > 1:
                worker.name = f"ds4tw-worker-{model.name}"
            worker.demand = self._bind(self._demanded, model)
            worker.idle_observers.append(self._bind(self._went_idle, model))
            worker.setServiceParent(self)

    @staticmethod
    def _bind(f: Callable[[Model], None], model: Model) -> Callable[[Worker], None]:
        return lambda _worker: f(model)

    # -- names -----------------------------------------------------------------

    def find(self, name: str | None, *, fallback: bool = True) -> Model | None:
        """
        The model that serves C{name}: a model's own name, then an exact
        alias, then the first glob alias that matches, then (with
        C{fallback}) the default: a single C{--model} server's one model
        serves every name, as it always has.
        """
        if name:
            found = self.models.get(name)
            if found is not None:
                return found
            for model in self.models.values():
                if name in model.aliases:
                    return model
            for model in self.models.values():
                if any(fnmatch.fnmatchcase(name, a) for a in model.aliases if is_glob(a)):
                    return model
        if not fallback:
            return None
        if self.default is not None:
            return self.models[self.default]
        if len(self.models) == 1 and not name:
            return next(iter(self.models.values()))
        return None

    def prepared(self, model: Model) -> Deferred[None]:
        """
        Fires once C{model}'s prompt side (vocabulary, chat template) is
        ready, off the reactor thread and without its weights; a new
        Deferred each call, so that one caller cancelling it (its client
        left) leaves the others waiting.
        """
        return model._preparation(self._offload).wait()

    # -- memory ----------------------------------------------------------------

    def used(self) -> int:
        """Bytes the budget counts now: every model loaded, loading or unloading."""
        return sum(m.memory() for m in self.models.values() if _in_memory(m))

    # -- loading and unloading ---------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for model in self.models.values():
            # Early errors (a file that is not a GGUF) and /v1/models' facts.
            self.prepared(model).addErrback(self._unreadable, model)

    def _unreadable(self, failure: Failure, model: Model) -> None:
        log.failure("ds4tw: {model}: cannot read the model", failure, model=model.name)

    def _demanded(self, model: Model) -> None:
        if model not in self._wanting:
            self._wanting.append(model)
        self._schedule()

    def _went_idle(self, model: Model) -> None:
        if model in self._wanting and model.worker.idle:
            self._wanting.remove(model)
        self._arm_idle_unload(model)
        self._schedule()

    def _schedule(self) -> None:
        """Load the waiting models, in order, while the budget has room."""
        while self._wanting:
            model = self._wanting[0]
            worker = model.worker
            if worker.state is not ModelState.UNLOADED or worker.idle:
                # Loading or loaded already (its queue moves), or nobody waits.
                self._wanting.pop(0)
                continue
            if not self.running:
                return
            need = model.memory()
            if self.budget is None or self.used() + need <= self.budget:
                self._wanting.pop(0)
                self._load(model)
                continue
            self._make_room(model, need)
            # Strictly in order: the next model waits behind this one.
            return

    def _make_room(self, model: Model, need: int) -> None:
        assert self.budget is not None
        if need > self.budget:
            self._wanting.remove(model)
            error = ModelTooLarge(
                f"the model {model.name} needs {need / _MIB:.0f} MiB, more than the "
                f"server's model memory budget ({self.budget / _MIB:.0f} MiB, "
                "--models-memory-mb)"
            )
            model.worker.refuse(error)
            return
        idle = sorted(
            (m for m in self.models.values() if m.worker.ready and m.worker.idle),
            key=lambda m: m.worker.last_used,
        )
        # What is being unloaded now is as good as free: wait for it.
        used = sum(
            m.memory()
            for m in self.models.values()
            if _in_memory(m) and m.worker.state is not ModelState.UNLOADING
        )
        if used - sum(m.memory() for m in idle) + need > self.budget:
            # Not even with every idle model gone: wait for running ones to end.
            return
        for victim in idle:
            if used + need <= self.budget:
                break
            log.info(
                "ds4tw: unloading {victim} (unused for {idle:.0f}s, {mib:.0f} MiB) to make room "
                "for {model} ({need:.0f} MiB; budget {budget:.0f} MiB, in use {used:.0f} MiB)",
                victim=victim.name,
                idle=self.clock.seconds() - victim.worker.last_used,
                mib=victim.memory() / _MIB,
                model=model.name,
                need=need / _MIB,
                budget=self.budget / _MIB,
                used=used / _MIB,
            )
            used -= victim.memory()
            self._unload(victim, "evicted")

    def _load(self, model: Model) -> None:
        log.info(
            "ds4tw: loading {model} (~{need:.0f} MiB; {used:.0f} MiB in use{budget})",
            model=model.name,
            need=model.memory() / _MIB,
            used=self.used() / _MIB,
            budget=f" of {self.budget / _MIB:.0f}" if self.budget is not None else "",
        )
        d = model.worker.load()

        def loaded(_: object) -> None:
            memory = model.engine.memory()
            log.info(
                "ds4tw: {model} loaded in {seconds:.2f}s: {total:.0f} MiB (weights {weights:.0f}, "
                "KV {kv:.0f}, compute {compute:.0f}, prompt cache {cache:.0f})",
                model=model.name,
                seconds=model.worker.load_seconds,
                total=memory.total / _MIB,
                weights=memory.weights / _MIB,
                kv=memory.kv / _MIB,
                compute=memory.compute / _MIB,
                cache=memory.cache / _MIB,
            )
            self._arm_idle_unload(model)

        d.addCallbacks(loaded, lambda _: None)
        d.addBoth(lambda _: self._schedule())

    def _unload(self, model: Model, why: str) -> None:
        self._cancel_idle_timer(model)
        d = model.worker.unload()
        d.addErrback(lambda f: log.failure("ds4tw: {model}: unload failed", f, model=model.name))
        d.addBoth(lambda _: self._schedule())
        model.unloads[why] = model.unloads.get(why, 0) + 1

    # -- idle unload ---------------------------------------------------------------

    def _idle_seconds(self, model: Model) -> float | None:
        return model.idle_unload if model.idle_unload is not None else self.idle_unload

    def _arm_idle_unload(self, model: Model) -> None:
        seconds = self._idle_seconds(model)
        worker = model.worker
        if not seconds or worker.state is not ModelState.READY or not worker.idle:
            return
        self._cancel_idle_timer(model)
        due = worker.last_used + seconds - self.clock.seconds()
        model._idle_timer = self.clock.callLater(max(due, 0.0), self._idle_due, model)

    def _cancel_idle_timer(self, model: Model) -> None:
        timer, model._idle_timer = model._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _idle_due(self, model: Model) -> None:
        model._idle_timer = None
        worker = model.worker
        seconds = self._idle_seconds(model)
        if not seconds or worker.state is not ModelState.READY or not worker.idle:
            return
        unused = self.clock.seconds() - worker.last_used
        if unused < seconds:
            self._arm_idle_unload(model)
            return
        log.info(
            "ds4tw: unloading {model}: unused for {unused:.0f}s (--idle-unload {seconds:g})",
            model=model.name,
            unused=unused,
            seconds=seconds,
        )
        self._unload(model, "idle")

    def stopService(self) -> Deferred[None]:
        for model in self.models.values():
            self._cancel_idle_timer(model)
        self._wanting.clear()
        d: Deferred[None] = super().stopService()
        return d


def is_glob(pattern: str) -> bool:
    """An alias that is a pattern (C{claude-*}), not a name."""
    return any(c in pattern for c in "*?[")


def _in_memory(model: Model) -> bool:
    return model.worker.state is not ModelState.UNLOADED


class _Once:
    """One Deferred's outcome, for any number of callers, each with its own Deferred."""

    def __init__(self, source: Deferred[Any]) -> None:
        self._outcome: object = _PENDING
        self._waiting: list[Deferred[None]] = []
        source.addBoth(self._settle)

    def _settle(self, outcome: object) -> None:
        self._outcome = outcome
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            self._fire(d)

    def _fire(self, d: Deferred[None]) -> None:
        if isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(None)

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred(lambda d: self._waiting.remove(d))
        if self._outcome is _PENDING:
            self._waiting.append(d)
        else:
            self._fire(d)
        return d


_PENDING = object()
