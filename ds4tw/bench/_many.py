"""
Many waiting clients: N concurrent streams queued behind one long job.

A blocker job decodes; N clients (default 200) open streams and wait in
the queue. Measured:

  - that every waiting client hears C{: queued} on time: the longest
    silence on each stream before its first data frame, against K + 0.1 s;
  - the server's RSS per waiting connection: (RSS with all N queued - RSS
    with only the blocker running) / N, from psutil on the server pid;
  - that every client ends cleanly: a quarter of them hang up while
    queued (each must be counted by the server as cancelled at C{queued},
    having cost no compute), then the blocker hangs up, and every other
    client must complete with C{[DONE]}. The server's /metrics must
    account for each one (jobs done, jobs cancelled by stage).

One asyncio loop carries all clients; connections are opened at most
L{CONNECT_CONCURRENCY} at a time (the server's listen backlog is finite;
a dropped SYN is retried by the kernel a second later, which would read
as server latency). The server runs with C{--max-queue} above N.

Covered by tests/unit/test_bench.py (L{client_outcome}) and
tests/integration/test_bench_smoke.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import _client
from ._cancel import parse_metrics
from ._keepalive import SLACK_S
from ._servers import ServerProcess
from ._settings import Settings
from ._sse import ResponseReader, comments, finish_reason, saw_done
from ._stats import gaps, summary
from ._workload import Prompts, completion_body

CONNECT_CONCURRENCY = 32


def client_outcome(stream: _client.Stream, cancelled: bool) -> dict[str, Any]:
    """
    One waiting client's story: how it ended (C{completed}, C{cancelled},
    C{error}), its longest silence while queued (before the first data
    frame), and its queued keepalive count.
    """
    reader = stream.reader
    first_data = next((e.t for e in reader.events if e.kind == "data"), None)
    waiting = [t for t, _ in reader.reads if first_data is None or t <= first_data]
    if stream.hung_up is not None:
        waiting.append(stream.hung_up)  # silence up to the hang-up counts too
    silences = gaps(waiting, start=stream.sent)
    points = [stream.sent, *sorted(waiting)]
    worst = max(range(len(silences)), key=silences.__getitem__) if silences else None
    if stream.error is not None or stream.status != 200:
        outcome = "error"
    elif cancelled:
        outcome = "cancelled" if first_data is None else "error"
    elif saw_done(reader.events) and finish_reason(reader.events) is not None:
        outcome = "completed"
    else:
        outcome = "error"
    return {
        "outcome": outcome,
        "max_queued_gap_s": max(silences) if silences else None,
        #: When the longest silence ended (perf_counter), to tell which
        #: phase of the run caused it.
        "max_gap_end_t": None if worst is None else points[worst + 1],
        "queued_frames": comments(reader.events).count("queued"),
        "connect_s": stream.connect_s,
        "status": stream.status,
        "error": stream.error,
    }


async def _run(server: ServerProcess, settings: Settings, n: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    prompts = Prompts(settings.seed + 29)
    port = server.port

    async def off(f: Any, *args: Any) -> Any:
        return await loop.run_in_executor(None, f, *args)

    metrics_before = parse_metrics((await off(_client.get, port, "/metrics"))[1].decode())
    blocker_go = asyncio.Event()
    blocker_started = asyncio.Event()

    def blocker_event(reader: ResponseReader) -> None:
        if reader.events:
            blocker_started.set()

    blocker_body = completion_body("ds4tw", prompts.words(settings.short_words), settings.ctx // 2)
    blocker = asyncio.ensure_future(
        _client.astream(
            port, "/v1/completions", blocker_body, hang_up=blocker_go, on_event=blocker_event
        )
    )
    await asyncio.wait_for(blocker_started.wait(), 120)
    rss_before = await off(server.rss)

    queued_count = 0
    all_queued = asyncio.Event()
    seen: set[int] = set()

    def watcher(i: int) -> Any:
        def on_event(reader: ResponseReader) -> None:
            nonlocal queued_count
            if i not in seen and any(
                e.kind == "comment" and e.text == "queued" for e in reader.events
            ):
                seen.add(i)
                queued_count += 1
                if queued_count >= n:
                    all_queued.set()

        return on_event

    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    cancel_set = {i for i in range(n) if i % 4 == 3}
    hang = {i: asyncio.Event() for i in cancel_set}
    t0 = time.perf_counter()
    tasks = [
        asyncio.ensure_future(
            _client.astream(
                port,
                "/v1/completions",
                completion_body("ds4tw", f"Client {i} says hello and", 2),
                hang_up=hang.get(i),
                on_event=watcher(i),
                connect_limit=limit,
                timeout=600 + n,
            )
        )
        for i in range(n)
    ]
    try:
        await asyncio.wait_for(all_queued.wait(), timeout=60 + n * 0.05 + settings.keepalive * 3)
        all_queued_s = time.perf_counter() - t0
    except TimeoutError:
        all_queued_s = None
    await asyncio.sleep(settings.clients_hold_s)
    rss_waiting = await off(server.rss)
    health = await off(_client.get_json, port, "/health")
    t_hang = time.perf_counter()
    for event in hang.values():
        event.set()
    # Let the hang-ups reach the server before the queue starts moving.
    await asyncio.sleep(max(0.5, settings.keepalive))
    blocker_go.set()
    drain_start = time.perf_counter()
    done, pending = await asyncio.wait(tasks, timeout=120 + n * 0.5)
    for task in pending:
        task.cancel()
    drain_s = time.perf_counter() - drain_start
    await asyncio.wait_for(blocker, 60)
    await off(_client.wait_idle, port, 60.0)
    metrics_after = parse_metrics((await off(_client.get, port, "/metrics"))[1].decode())

    outcomes: list[dict[str, Any]] = [
        client_outcome(t.result(), i in cancel_set)
        if t in done and not t.cancelled()
        else {"outcome": "error", "error": "did not finish in time", "max_queued_gap_s": None}
        for i, t in enumerate(tasks)
    ]

    def delta(kind: str, key: str) -> float:
        return float(metrics_after[kind].get(key, 0) - metrics_before[kind].get(key, 0))

    limit_s = settings.keepalive + SLACK_S
    phases = {"connecting": t0, "holding": t0 + (all_queued_s or 0.0), "hang_ups": t_hang}
    phases["draining"] = drain_start

    def phase_of(t: float | None) -> str | None:
        if t is None:
            return None
        return max((p for p in phases.items() if p[1] <= t), key=lambda p: p[1])[0]

    worst_by_phase: dict[str, float] = {}
    for o in outcomes:
        name = phase_of(o.get("max_gap_end_t"))
        if name is not None and o["max_queued_gap_s"] is not None:
            worst_by_phase[name] = max(worst_by_phase.get(name, 0.0), o["max_queued_gap_s"])
    queued_gaps = [o["max_queued_gap_s"] for o in outcomes if o["max_queued_gap_s"] is not None]
    counts = {k: sum(1 for o in outcomes if o["outcome"] == k) for k in ("completed", "cancelled")}
    counts["error"] = n - counts["completed"] - counts["cancelled"]
    return {
        "clients": n,
        "keepalive_s": settings.keepalive,
        "limit_s": limit_s,
        "hung_up_while_queued": len(cancel_set),
        "outcomes": counts,
        "all_accounted": counts["error"] == 0
        and delta("jobs", "done") == counts["completed"]
        and delta("cancelled", "queued") == counts["cancelled"],
        "server_counts": {
            "done": delta("jobs", "done"),
            "cancelled_queued": delta("cancelled", "queued"),
            "cancelled_decode": delta("cancelled", "decode"),
            "queued_keepalive_frames": delta("keepalive_frames", "queued"),
        },
        "queue_depth_seen": health.get("queue_depth"),
        "all_queued_after_s": all_queued_s,
        "max_queued_gap_s": summary(queued_gaps),
        "late_clients": sum(1 for g in queued_gaps if g > limit_s),
        # Where the longest silences happened: connecting (requests still
        # arriving), holding (all queued), hang_ups (a quarter leaving),
        # draining (the queue moving).
        "max_gap_by_phase_s": worst_by_phase,
        "queued_frames_per_client": summary([o.get("queued_frames", 0) for o in outcomes]),
        "connect_s": summary([o.get("connect_s") for o in outcomes]),
        "rss_before_bytes": rss_before,
        "rss_waiting_bytes": rss_waiting,
        "rss_per_waiting_client_bytes": (rss_waiting - rss_before) / n if n else None,
        "drain_s": drain_s,
        "errors": [o["error"] for o in outcomes if o["outcome"] == "error"][:10],
    }


def measure(server: ServerProcess, settings: Settings, n: int) -> dict[str, Any]:
    return asyncio.run(_run(server, settings, n))
