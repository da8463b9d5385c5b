"""
The one model thread every model shares (ds4tw._runtime.modelthread): a
real thread, with a stand-in reactor whose callFromThread hands results
to the test.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from twisted.python.failure import Failure

from ds4tw._runtime.modelthread import ModelThread


class Reactor:
    """callFromThread only: the calls wait in a queue the test drains."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., object], tuple[Any, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., object], *args: Any) -> None:
        self.calls.put((f, args))

    def settle(self, results: list[object], count: int) -> None:
        """Run deliveries until C{results} has C{count} entries."""
        while len(results) < count:
            f, args = self.calls.get(timeout=10)
            f(*args)


def test_two_models_loops_take_turns_one_step_each() -> None:
    reactor = Reactor()
    thread = ModelThread(reactor)
    order: list[str] = []
    gate = threading.Event()

    def loop(name: str, steps: int) -> Iterator[None]:
        gate.wait(10)  # both loops are queued before either steps
        for _ in range(steps):
            order.append(name)
            yield

    done: list[object] = []
    thread.start()
    thread.start()
    thread.run(loop("a", 3)).addCallback(done.append)
    thread.run(loop("b", 3)).addCallback(done.append)
    gate.set()
    reactor.settle(done, 2)
    thread.stop()
    thread.stop()
    assert thread.join(timeout=10)
    # Neither waits for the other's whole reply.
    assert order == ["a", "b", "a", "b", "a", "b"]


def test_calls_run_in_order_between_steps_and_failures_reach_the_caller() -> None:
    reactor = Reactor()
    thread = ModelThread(reactor)
    seen: list[str] = []
    results: list[object] = []
    gate = threading.Event()

    def loop() -> Iterator[None]:
        gate.wait(10)  # the calls are queued while the first step runs
        for i in range(3):
            seen.append(f"step {i}")
            yield

    def fails() -> None:
        raise OSError("no such model")

    thread.start()
    thread.run(loop()).addCallback(results.append)
    thread.call(seen.append, "load").addCallback(results.append)
    thread.call(fails).addErrback(results.append)
    gate.set()
    reactor.settle(results, 3)
    thread.stop()
    assert thread.join(timeout=10)
    assert seen.index("load") < len(seen) - 1  # a load does not wait for a whole loop
    failure = next(r for r in results if isinstance(r, Failure))
    assert failure.check(OSError) and "no such model" in str(failure.value)


def test_the_thread_stops_after_the_last_user_once_its_work_is_done() -> None:
    reactor = Reactor()
    thread = ModelThread(reactor)
    thread.start()
    thread.start()
    thread.stop()
    names = {t.name for t in threading.enumerate()}
    assert "ds4tw-model" in names  # one user left
    closed: list[object] = []
    thread.call(closed.append, "closed")
    # Never waits in the reactor thread: the thread ends by itself once the
    # queued close has run.
    thread.stop()
    assert thread.join(timeout=10)
    f, args = reactor.calls.get(timeout=1)
    f(*args)
    assert closed == ["closed"]
    assert "ds4tw-model" not in {t.name for t in threading.enumerate()}
