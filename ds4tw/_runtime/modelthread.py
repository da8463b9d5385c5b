"""
One model thread for every model a server runs.

Every ggml computation of the process happens on one thread: a second
thread that calls C{llama_decode} makes libgomp throttle decode about
3x on a CPU (docs/performance.md, "One ggml thread, always"), and two
models stepping at once on two cores collapse the same way. So when
several models are loaded, their batch loops take turns on this thread,
one engine step each (L{ModelThread.run}): two streams on two models
both advance, each at about half the speed of one alone, and neither
waits for the other's whole reply. Loads and unloads
(L{ModelThread.call}) run between two steps, so a model loading pauses
the others' decoding for as long as the load takes (a model read from
the page cache: a fraction of a second; from disk: the disk's speed),
which their streams sit through with keepalive frames.

On a GPU the same rule holds for now: one thread queues every model's
work, which keeps the rule simple and costs little while one model
decodes at a time; two models decoding at once on separate GPUs would
be faster with a thread each (not built).

Covered by tests/unit/test_modelthread.py and tests/unit/test_fleet.py.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["ModelThread"]

_T = TypeVar("_T")


@dataclass
class _Loop:
    steps: Iterator[None]
    done: Deferred[None]


@dataclass
class _Call:
    f: Callable[[], Any]
    done: Deferred[Any]


class ModelThread:
    """
    A L{ds4tw._runtime.worker.WorkerThreads} that several workers share:
    one dedicated thread runs their calls in order and their batch loops
    round-robin, one step of each in turn. It starts with the first
    worker's L{start} and stops after the last one's L{stop}.
    """

    def __init__(self, reactor: Any, name: str = "ds4tw-model") -> None:
        self._reactor = reactor
        self._name = name
        self._lock = threading.Condition()
        self._calls: deque[_Call] = deque()
        self._loops: deque[_Loop] = deque()
        self._users = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: The thread L{stop} let go, for L{join}.
        self._ended: threading.Thread | None = None

    # -- WorkerThreads ------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._users += 1
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """
        Let the thread end once the last user stops and its queued work is
        done. Not joined here: this runs in the reactor thread, which must
        never wait on the model thread (its users stop it only after their
        last call, the model's close, has come back, so nothing of theirs
        is left on it); L{join} waits for it where waiting is fine.
        """
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._thread is None:
                return
            self._stopping = True
            self._ended, self._thread = self._thread, None
            self._lock.notify()

    def join(self, timeout: float | None = None) -> bool:
        """Wait (never in the reactor thread) for a stopped thread to end; whether it has."""
        ended = self._ended
        if ended is not None:
            ended.join(timeout)
            return not ended.is_alive()
        return self._thread is None

    def call(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        d: Deferred[_T] = Deferred()
        with self._lock:
            self._calls.append(_Call(lambda: f(*args), d))
            self._lock.notify()
        return d

    def run(self, steps: Iterator[None]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        with self._lock:
            self._loops.append(_Loop(steps, d))
            self._lock.notify()
        return d

    def offload(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def to_reactor(self, f: Callable[..., object], *args: Any) -> None:
        self._reactor.callFromThread(f, *args)

    # -- the thread -----------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not (self._calls or self._loops or self._stopping):
                    self._lock.wait()
                if not (self._calls or self._loops):
                    return
                call = self._calls.popleft() if self._calls else None
                loop = self._loops.popleft() if self._loops else None
            if call is not None:
                self._run_call(call)
            if loop is not None:
                self._step(loop)

    def _run_call(self, call: _Call) -> None:
        try:
            result = call.f()
        except BaseException:
            failure = Failure()
            self.to_reactor(call.done.errback, failure)
        else:
            self.to_reactor(call.done.callback, result)

    def _step(self, loop: _Loop) -> None:
        try:
            next(loop.steps)
        except StopIteration:
            self.to_reactor(loop.done.callback, None)
            return
        except BaseException:
            failure = Failure()
            self.to_reactor(loop.done.errback, failure)
            return
        with self._lock:
            # To the back: the next model's loop steps first.
            self._loops.append(loop)
