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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._engine.embed import Embedder
from .._engine.interface import Engine, MemoryUse
from .embedding import EmbeddingWorker
from .modelset import Names, is_glob
from .runner import ModelRunner
from .worker import ModelState, NotReady, Worker, WorkerThreads

__all__ = ["Fleet", "Model", "ModelTooLarge"]

log = Logger()

_MIB = 2**20


class ModelTooLarge(NotReady):
    """The model alone needs more memory than the budget allows."""


@dataclass(eq=False)
class Model:
    """
    One model of a server: its engine (chat) and/or embedder, the names
    that reach it, and how the fleet treats it. The fleet gives it its
    workers.

    @ivar name: what C{/v1/models} lists (default: the engine's model id).
    @ivar aliases: other names requests may use: exact names, or glob
        patterns (C{claude-haiku-*}, fnmatch syntax).
    @ivar embedder: serves C{/v1/embeddings}: alone (an embedding model),
        or beside the chat engine (C{--embeddings}: a second context on
        the same file, loaded when first asked for).
    @ivar memory_bytes: what the budget counts for it instead of what
        the engine reports (a models file's C{memory_mb}).
    @ivar idle_unload: seconds unused before it is unloaded (None: the
        fleet's setting).
    @ivar reasoning_parser: overrides the server's C{--reasoning-parser}.
    @ivar tool_call_parser: overrides the server's C{--tool-call-parser}.
    """

    engine: Engine | None = None
    name: str = ""
    aliases: tuple[str, ...] = ()
    embedder: Embedder | None = None
    memory_bytes: int | None = None
    idle_unload: float | None = None
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    #: Unloads by why: C{evicted} (room for another), C{idle}.
    unloads: dict[str, int] = field(default_factory=dict)
    _worker: Worker | None = field(default=None, init=False, repr=False)
    _embedding_worker: EmbeddingWorker | None = field(default=None, init=False, repr=False)
    _units: list[_Unit] = field(default_factory=list, init=False, repr=False)
    _prepared: _Once | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.engine is None and self.embedder is None:
            raise ValueError("a model needs an engine, an embedder, or both")
        if not self.name:
            first = self.engine if self.engine is not None else self.embedder
            assert first is not None
            self.name = first.model_id

    @property
    def kind(self) -> Literal["chat", "embedding"]:
        """C{chat}, or C{embedding} for a model that only embeds."""
        return "chat" if self.engine is not None else "embedding"

    @property
    def worker(self) -> Worker:
        """The chat model's worker (a model that only embeds has none)."""
        assert self._worker is not None, "no chat engine, or not in a fleet yet"
        return self._worker

    @property
    def embedding_worker(self) -> EmbeddingWorker | None:
        return self._embedding_worker

    @property
    def runner(self) -> ModelRunner:
        """The main worker: the chat one, else the embedding one."""
        return self._units[0].runner

    @property
    def n_ctx(self) -> int:
        if self.engine is not None:
            return self.engine.n_ctx
        assert self.embedder is not None
        return self.embedder.n_ctx

    def memory(self) -> int:
        """Bytes the budget counts for this model (measured once loaded)."""
        return sum(unit.memory() for unit in self._units)

    def memory_use(self) -> MemoryUse:
        """What llama.cpp reports (or the estimate), summed over its engines."""
        parts = [unit.memory_of() for unit in self._units]
        return MemoryUse(
            weights=sum(p.weights for p in parts),
            kv=sum(p.kv for p in parts),
            compute=sum(p.compute for p in parts),
            cache=sum(p.cache for p in parts),
            measured=all(p.measured for p in parts),
        )

    def _preparation(self, offload: Callable[..., Deferred[Any]]) -> _Once:
        if self._prepared is None:
            self._prepared = _Once(offload(self._prepare))
        return self._prepared

    def _prepare(self) -> None:
        if self.engine is not None:
            self.engine.prepare()
        if self.embedder is not None:
            self.embedder.prepare()


@dataclass(eq=False)
class _Unit:
    """One thing the budget counts and the fleet loads: a model's chat engine or its embedder."""

    model: Model
    runner: ModelRunner
    memory_of: Callable[[], MemoryUse]
    #: The model's own C{memory_bytes} applies to its first unit.
    first: bool
    what: str
    timer: IDelayedCall | None = None
    #: Seconds idle before an unload a client asked for (Ollama's
    #: C{keep_alive}; None: never), over the model's and the server's.
    keep_alive: float | Literal["unset"] | None = "unset"
    #: A client asked for an unload while the model was busy: unload once idle.
    release: bool = False

    @property
    def label(self) -> str:
        return self.model.name if self.first else f"{self.model.name} ({self.what})"

    def memory(self) -> int:
        if self.first and self.model.memory_bytes is not None:
            return self.model.memory_bytes
        return self.memory_of().total

    @property
    def in_memory(self) -> bool:
        return self.runner.state is not ModelState.UNLOADED


class Fleet(MultiService):
    """
    The models, by name and alias, and when each is loaded.

    @param models: in order: the first one that matches a name by glob
        serves it.
    @param on_demand: load each model at its first request (False: load
        every model at start, as a single C{--model} server does).
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
        self._names = Names(((m.name, m.aliases) for m in models), default)
        self.budget = budget
        self.idle_unload = idle_unload
        #: Models load when asked for, and may be unloaded (False: the
        #: models load at start and stay).
        self.on_demand = on_demand
        self.clock = clock
        self._offload = threads.offload
        self.units: list[_Unit] = []
        #: Units whose requests wait for a load, in the order they asked.
        self._wanting: list[_Unit] = []
        several = len(models) > 1
        for model in models:
            if model.engine is not None:
                worker = model._worker = Worker(
                    model.engine,
                    threads,
                    max_queue,
                    drain_timeout=drain_timeout,
                    clock=clock,
                    on_demand=on_demand,
                )
                if several:
                    worker.name = f"ds4tw-worker-{model.name}"
                self._add(_Unit(model, worker, model.engine.memory, True, "chat"), worker)
            if model.embedder is not None:
                embedding = model._embedding_worker = EmbeddingWorker(
                    model.embedder,
                    threads,
                    max_queue,
                    drain_timeout=drain_timeout,
                    clock=clock,
                    # Beside a chat engine, the embedding context loads when
                    # first asked for, whatever the chat model does.
                    on_demand=on_demand or model.engine is not None,
                )
                embedding.name = f"ds4tw-embeddings-{model.name}"
                first = model.engine is None
                self._add(
                    _Unit(model, embedding, model.embedder.memory, first, "embeddings"), embedding
                )

    def _add(self, unit: _Unit, runner: Worker | EmbeddingWorker) -> None:
        self.units.append(unit)
        unit.model._units.append(unit)
        runner.demand = lambda _runner: self._demanded(unit)
        runner.idle_observers.append(lambda _runner: self._went_idle(unit))
        runner.setServiceParent(self)

    # -- names -----------------------------------------------------------------

    def find(self, name: str | None, *, fallback: bool = True) -> Model | None:
        """
        The model that serves C{name}: a model's own name, then an exact
        alias, then the first glob alias that matches, then (with
        C{fallback}) the default: a single C{--model} server's one model
        serves every name, as it always has.
        """
        found = self._names.match(name, fallback=fallback)
        return None if found is None else self.models[found[0]]

    def listed(self) -> list[tuple[str, Model]]:
        """
        Every name a client may list: each model's own, then its exact
        aliases (globs name no one), in the models' order.
        """
        out: list[tuple[str, Model]] = []
        for m in self.models.values():
            out.append((m.name, m))
            out.extend((alias, m) for alias in m.aliases if not is_glob(alias))
        return out

    def prepared(self, model: Model) -> Deferred[None]:
        """
        Fires once C{model}'s prompt side (vocabulary, chat template) is
        ready, off the reactor thread and without its weights; a new
        Deferred each call, so that one caller cancelling it (its client
        left) leaves the others waiting.
        """
        return model._preparation(self._offload).wait()

    def _main_unit(self, model: Model) -> _Unit:
        return next(u for u in model._units if u.first)

    def warm(self, model: Model) -> Deferred[None]:
        """
        Load C{model} now, with no request for it (Ollama's load request):
        fires once it is in (at once when it is), or fails with
        L{NotReady} saying why not. Cancelling it is the client leaving.
        """
        unit = self._main_unit(model)
        unit.release = False
        return unit.runner.warm()

    def release(self, model: Model) -> Deferred[None]:
        """
        Unload C{model} (Ollama's C{keep_alive: 0}): now when it is idle,
        else once what runs and waits for it is done. Fires once it is
        out or asked to go; a server that does not load on demand never
        unloads (L{NotReady}).
        """
        if not self.on_demand:
            return fail(
                NotReady("this server keeps its model loaded; it does not unload on request")
            )
        waits = []
        for unit in model._units:
            runner = unit.runner
            if runner.state is ModelState.READY and runner.idle:
                waits.append(self._unload(unit, "requested"))
            elif unit.in_memory:
                unit.release = True
        return gatherResults(waits).addCallback(lambda _: None)

    def keep_alive(self, model: Model, seconds: float | None) -> None:
        """
        Keep C{model} loaded C{seconds} once idle (None: for ever; 0:
        unload it as soon as it is idle), as a client asked (Ollama's
        C{keep_alive}), until another asks otherwise. A server that does
        not load on demand keeps its model anyway; under a memory budget
        an idle model may still be evicted.
        """
        if not self.on_demand:
            return
        for unit in model._units:
            if seconds == 0:
                # Not "idle for 0 s, never": Ollama unloads the model as
                # soon as the request that said so is done.
                unit.release = unit.in_memory or unit.first
                continue
            unit.keep_alive = seconds
            if unit.runner.ready and unit.runner.idle:
                self._cancel_idle_timer(unit)
                self._arm_idle_unload(unit)

    def unload_due(self, model: Model) -> float | None:
        """
        When (the clock's seconds) C{model} is unloaded for being idle, if
        nothing uses it meanwhile; a busy model counts its idle time from
        now. None: never (or not loaded).
        """
        if not self.on_demand:
            return None
        due: float | None = None
        for unit in model._units:
            if not unit.runner.ready:
                continue
            if unit.timer is not None and unit.timer.active():
                at = unit.timer.getTime()
            else:
                seconds = self._idle_seconds(unit)
                if not seconds:
                    return None  # this part stays: so does the model
                at = self.clock.seconds() + seconds
            due = at if due is None else max(due, at)
        return due

    # -- memory ----------------------------------------------------------------

    def used(self) -> int:
        """Bytes the budget counts now: everything loaded, loading or unloading."""
        return sum(u.memory() for u in self.units if u.in_memory)

    # -- loading and unloading ---------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for model in self.models.values():
            # Early errors (a file that is not a GGUF) and /v1/models' facts.
            self.prepared(model).addErrback(self._unreadable, model)

    def _unreadable(self, failure: Failure, model: Model) -> None:
        log.failure("ds4tw: {model}: cannot read the model", failure, model=model.name)

    def _demanded(self, unit: _Unit) -> None:
        if unit not in self._wanting:
            self._wanting.append(unit)
        self._schedule()

    def _went_idle(self, unit: _Unit) -> None:
        if unit in self._wanting and unit.runner.idle:
            self._wanting.remove(unit)
        if unit.release and unit.runner.ready:
            self._unload(unit, "requested")
        else:
            self._arm_idle_unload(unit)
        self._schedule()

    def _schedule(self) -> None:
        """Load the waiting models, in order, while the budget has room."""
        while self._wanting:
            unit = self._wanting[0]
            runner = unit.runner
            if runner.state is not ModelState.UNLOADED or runner.idle:
                # Loading or loaded already (its queue moves), or nobody waits.
                self._wanting.pop(0)
                continue
            if not self.running:
                return
            need = unit.memory()
            if self.budget is None or self.used() + need <= self.budget:
                self._wanting.pop(0)
                self._load(unit)
                continue
            self._make_room(unit, need)
            # Strictly in order: the next model waits behind this one.
            return

    def _make_room(self, unit: _Unit, need: int) -> None:
        assert self.budget is not None
        if need > self.budget:
            self._wanting.remove(unit)
            error = ModelTooLarge(
                f"the model {unit.label} needs {need / _MIB:.0f} MiB, more than the "
                f"server's model memory budget ({self.budget / _MIB:.0f} MiB, "
                "--models-memory-mb)"
            )
            unit.runner.refuse(error)
            unit.runner.fail_warming(error)
            return
        idle = sorted(
            (u for u in self.units if u.runner.ready and u.runner.idle),
            key=lambda u: u.runner.last_used,
        )
        # What is being unloaded now is as good as free: wait for it.
        used = sum(
            u.memory()
            for u in self.units
            if u.in_memory and u.runner.state is not ModelState.UNLOADING
        )
        if used - sum(u.memory() for u in idle) + need > self.budget:
            # Not even with every idle model gone: wait for running ones to end.
            return
        for victim in idle:
            if used + need <= self.budget:
                break
            log.info(
                "ds4tw: unloading {victim} (unused for {idle:.0f}s, {mib:.0f} MiB) to make room "
                "for {model} ({need:.0f} MiB; budget {budget:.0f} MiB, in use {used:.0f} MiB)",
                victim=victim.label,
                idle=self.clock.seconds() - victim.runner.last_used,
                mib=victim.memory() / _MIB,
                model=unit.label,
                need=need / _MIB,
                budget=self.budget / _MIB,
                used=used / _MIB,
            )
            used -= victim.memory()
            self._unload(victim, "evicted")

    def _load(self, unit: _Unit) -> None:
        log.info(
            "ds4tw: loading {model} (~{need:.0f} MiB; {used:.0f} MiB in use{budget})",
            model=unit.label,
            need=unit.memory() / _MIB,
            used=self.used() / _MIB,
            budget=f" of {self.budget / _MIB:.0f}" if self.budget is not None else "",
        )
        d = unit.runner.load()

        def loaded(_: object) -> None:
            memory = unit.memory_of()
            log.info(
                "ds4tw: {model} loaded in {seconds:.2f}s: {total:.0f} MiB (weights {weights:.0f}, "
                "KV {kv:.0f}, compute {compute:.0f}, prompt cache {cache:.0f})",
                model=unit.label,
                seconds=unit.runner.load_seconds,
                total=memory.total / _MIB,
                weights=memory.weights / _MIB,
                kv=memory.kv / _MIB,
                compute=memory.compute / _MIB,
                cache=memory.cache / _MIB,
            )
            self._arm_idle_unload(unit)

        d.addCallbacks(loaded, lambda _: None)
        d.addBoth(lambda _: self._schedule())

    def _unload(self, unit: _Unit, why: str) -> Deferred[None]:
        unit.release = False
        self._cancel_idle_timer(unit)
        d = unit.runner.unload()
        d.addErrback(lambda f: log.failure("ds4tw: {model}: unload failed", f, model=unit.label))
        d.addBoth(lambda _: self._schedule())
        unloads = unit.model.unloads
        unloads[why] = unloads.get(why, 0) + 1
        return d

    # -- idle unload ---------------------------------------------------------------

    def _idle_seconds(self, unit: _Unit) -> float | None:
        if unit.keep_alive != "unset":
            return unit.keep_alive
        seconds = unit.model.idle_unload
        return seconds if seconds is not None else self.idle_unload

    def _arm_idle_unload(self, unit: _Unit) -> None:
        seconds = self._idle_seconds(unit)
        runner = unit.runner
        if not seconds or not runner.ready or not runner.idle:
            return
        self._cancel_idle_timer(unit)
        due = runner.last_used + seconds - self.clock.seconds()
        unit.timer = self.clock.callLater(max(due, 0.0), self._idle_due, unit)

    def _cancel_idle_timer(self, unit: _Unit) -> None:
        timer, unit.timer = unit.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _idle_due(self, unit: _Unit) -> None:
        unit.timer = None
        runner = unit.runner
        seconds = self._idle_seconds(unit)
        if not seconds or not runner.ready or not runner.idle:
            return
        unused = self.clock.seconds() - runner.last_used
        if unused < seconds:
            self._arm_idle_unload(unit)
            return
        log.info(
            "ds4tw: unloading {model}: unused for {unused:.0f}s (--idle-unload {seconds:g})",
            model=unit.label,
            unused=unused,
            seconds=seconds,
        )
        self._unload(unit, "idle")

    def stopService(self) -> Deferred[None]:
        for unit in self.units:
            self._cancel_idle_timer(unit)
        self._wanting.clear()
        d: Deferred[None] = super().stopService()
        return d


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
