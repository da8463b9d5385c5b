"""
CPU time per token, per thread group, of a stack while it decodes.

Wall-clock throughput on a shared 2-core machine is noisy; CPU time is
much less so, and it says *where* a server spends: its main thread (the
Twisted reactor for ds4tw, the asyncio loop for llama_cpp.server, the
generation loop itself for raw) versus its other threads (the model
thread and ggml's workers). On a 2-core machine whose two cores the
model already uses, every CPU-microsecond the main thread spends per
token is taken from a ggml thread, so "main-thread CPU per token over
token time" is a direct estimate of the throughput lost to the server
layer.

Reads /proc/PID/task/*/stat (utime + stime, in clock ticks, so each
sample has a 10 ms resolution; summed over hundreds of tokens that is
fine).

Covered by tests/unit/test_bench.py (L{parse_stat}, L{split}).
"""

from __future__ import annotations

import os
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_stat(text: str) -> float:
    """CPU seconds (user + system) from one /proc/.../stat line."""
    # The command name may contain spaces and parentheses: split after the last ")".
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def thread_times(pid: int) -> dict[int, float]:
    """CPU seconds of every live thread of C{pid}, by thread id."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out[int(tid)] = parse_stat(f.read())
        except (OSError, IndexError, ValueError):
            continue  # the thread ended between listdir and open
    return out


def split(pid: int, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU seconds between two samples: the main thread (tid == pid) and the rest."""
    main = after.get(pid, 0.0) - before.get(pid, 0.0)
    other = sum(t - before.get(tid, 0.0) for tid, t in after.items() if tid != pid)
    return {"main_s": max(0.0, main), "other_s": max(0.0, other)}


def per_token(totals: dict[str, float], tokens: int) -> dict[str, Any]:
    """Milliseconds of CPU per token, by thread group, and in total."""
    if tokens <= 0:
        return {"main_ms": None, "other_ms": None, "total_ms": None, "client_ms": None}
    out: dict[str, Any] = {
        "main_ms": totals.get("main_s", 0.0) * 1e3 / tokens,
        "other_ms": totals.get("other_s", 0.0) * 1e3 / tokens,
    }
    out["total_ms"] = out["main_ms"] + out["other_ms"]
    out["client_ms"] = (
        totals["client_s"] * 1e3 / tokens if totals.get("client_s") is not None else None
    )
    out["tokens"] = tokens
    return out
