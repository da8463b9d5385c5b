"""
How busy the machine was with other work while the benchmark ran.

On a shared 2-core machine another process using a core slows a 2-thread
ggml computation far more than its share (the threads meet at a barrier
after every operation, so one descheduled thread stalls both). The
benchmark cannot prevent that, but it can record it: a background thread
samples, once a second, the CPU time of the whole machine (/proc/stat)
minus that of the benchmark's own processes (this process and its
children, the servers), and reports the foreign load in cores per part.

Reading /proc/stat and a few processes' times once a second costs well
under a millisecond, so the monitor does not disturb what it watches.

Covered by tests/unit/test_bench.py (L{foreign_cores}).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from ._stats import summary

#: Seconds between samples.
INTERVAL = 1.0


def busy_seconds() -> float | None:
    """CPU-seconds the whole machine has been busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds(seen: dict[int, float] | None = None) -> float:
    """
    CPU-seconds used by this process and its descendants. With C{seen}
    (pid -> last CPU time, kept by the caller) a descendant that has
    exited still counts with its last known time, so the total never goes
    down when a server stops.
    """
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the bench extra
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    seen = {} if seen is None else seen
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            seen[proc.pid] = max(seen.get(proc.pid, 0.0), sum(proc.cpu_times()[:2]))
    return sum(seen.values())


def foreign_cores(
    busy: tuple[float, float], own: tuple[float, float], wall: tuple[float, float]
) -> float | None:
    """
    Cores used by other processes between two samples: (machine busy -
    own busy) / wall time, clamped at 0 (the two clocks tick separately).
    """
    dt = wall[1] - wall[0]
    if dt <= 0:
        return None
    return max(0.0, ((busy[1] - busy[0]) - (own[1] - own[0])) / dt)


class Monitor:
    """Samples foreign load in a daemon thread; L{mark} names the part running."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._part = "start"
        self._samples: list[tuple[str, float]] = []
        self._thread = threading.Thread(target=self._run, name="bench-noise", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def mark(self, part: str) -> None:
        self._part = part

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=self._interval * 5)
        parts: dict[str, list[float]] = {}
        for part, value in self._samples:
            parts.setdefault(part, []).append(value)
        out = {}
        for part, values in parts.items():
            s = summary(values)
            s.pop("values", None)
            out[part] = s
        every = summary([v for _, v in self._samples])
        every.pop("values", None)
        return {"foreign_cores_by_part": out, "foreign_cores": every}

    def _run(self) -> None:
        seen: dict[int, float] = {}
        busy, own, wall = busy_seconds(), own_seconds(seen), time.perf_counter()
        if busy is None:
            return
        while not self._stop.wait(self._interval):
            b, o, w = busy_seconds(), own_seconds(seen), time.perf_counter()
            if b is None:
                return
            value = foreign_cores((busy, b), (own, o), (wall, w))
            if value is not None:
                self._samples.append((self._part, value))
            busy, own, wall = b, o, w


def wait_quiet(
    max_s: float, threshold: float = 0.25, window_s: float = 5.0, interval: float = INTERVAL
) -> dict[str, Any]:
    """
    Wait until other processes have used less than C{threshold} cores for
    C{window_s} seconds in a row, at most C{max_s} seconds. Returns how
    long it waited and whether the machine was quiet in the end.
    """
    start = time.perf_counter()
    quiet_since: float | None = None
    seen: dict[int, float] = {}
    busy, own, wall = busy_seconds(), own_seconds(seen), start
    if busy is None:
        return {"waited_s": 0.0, "quiet": None}
    while time.perf_counter() - start < max_s:
        time.sleep(interval)
        b, o, w = busy_seconds(), own_seconds(seen), time.perf_counter()
        if b is None:
            break
        load = foreign_cores((busy, b), (own, o), (wall, w))
        busy, own, wall = b, o, w
        if load is not None and load < threshold:
            quiet_since = quiet_since if quiet_since is not None else w - interval
            if w - quiet_since >= window_s:
                return {"waited_s": w - start, "quiet": True}
        else:
            quiet_since = None
    return {"waited_s": time.perf_counter() - start, "quiet": False}
