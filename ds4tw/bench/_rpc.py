"""
A model over several machines (issue 23): what llama.cpp's RPC split
costs against the same model in this process, and what it puts on the
wire per token, the figure that carries to a real network.

Four arms, each the same model (the run's, the demo model by default)
with the same options, loaded at once and measured interleaved:

  - C{local}: a L{ds4tw.LlamaEngine} in this process, on this machine's
    CPU; the baseline every ratio is taken against (L{BASELINE});
  - C{child}: the same engine in a L{ds4tw._engine.process.ProcessEngine}
    with no RPC: the cost of the process boundary alone (a pipe round
    trip per step, the step's events pickled back);
  - C{split}: a ProcessEngine whose model has every layer on two
    C{ds4tw-rpc-worker} processes on loopback ports
    (C{EngineOptions(rpc=(A, B), gpu_layers="all", tensor_split=(1, 1))});
  - C{half}: a ProcessEngine over two more workers with half the layers
    offloaded (L{half_layers}: the upper 15 of the demo model's 30 and
    the output layer on the workers, the lower 15 and the input layer
    here). Two more workers, because a worker serves one client at a
    time and each loaded model holds its connection.

Threads: one for everyone by default (C{--threads N} sets the engines'
and each worker's). On a 2-core machine the split's processes take turns
rather than run at once: one sequence's step goes through the layers in
order (the head's input layer, worker A's layers, worker B's), so at any
moment one of them computes and the others wait on a socket. With one
thread each, every arm computes on one core at a time and the other
core is left to what the split adds (the dispatcher threads, loopback
copies, the pipe, this process). Two threads each would let the local
arm use both cores while the split's two workers and the head, three
2-thread pools on 2 cores, would be measured mostly fighting over them.

Per arm and round, with the round's own prompt (fresh words, about 200
tokens, one prefill batch; the same text for the four arms, none of it
in any slot), greedy with C{ignore_eos}:

  - B{TTFT}: from C{generate} to the first token (the prompt's prefill
    and the first sampling; for the child arms, the pipe's messages);
  - B{decode tok/s}: (tokens - 1) over the time from resuming the
    generator after the first token to the last token (the counters are
    read between the two, off the clock);
  - B{bytes on the wire} between this machine's model and the workers,
    for the prefill (from before C{generate} to the first token) and for
    the decode (the rest), from the kernel: C{ss -tinH} before, at the
    first token and after, on the connections to the workers' ports
    (L{parse_ss}). Each direction is counted where it is received:
    C{bytes_received} of the worker's socket (to the worker) and of
    ggml's socket (from the worker). C{bytes_sent} is not used: it
    counts retransmissions, and loopback with BBR retransmits (seen:
    0.1 % of a model load). C{/proc/PID/io} is read too
    (L{parse_proc_io}) and shows why it is not the source: its
    C{rchar}/C{wchar} count C{read}/C{write}, and ggml-rpc moves its data
    with C{send}/C{recv}, which they never see;
  - CPU seconds of this process, the child and the workers
    (C{/proc/PID/task/*/stat}), summed over the rounds per token.

Then B{round trips}, counted once, off the clock (L{trace}): each RPC
arm loaded again through a L{Tap} in front of each worker, a loopback
proxy that parses ggml-rpc's protocol as it forwards it (requests
C{| cmd (1 byte) | size (8) | payload |}, replies C{| size (8) |
payload |}, only for the commands in L{REPLIES}) and counts commands,
bytes and replies per phase. ggml's client waits for each reply before
it sends anything else to that worker, and the layers run one worker
after the other, so at RTT r a step waits about (replies per step) x r
for the network: the figure that carries to a real network with the
bytes. The tap's byte counts are checked against C{ss} on its own port.

From the bytes and the round trips, L{network_table} computes (does not
measure) what a real link would add per token and per prompt
(L{LINKS}).

Covered by tests/unit/test_bench_rpc.py (the ss and /proc parsing on
captured output, the protocol parser, the arithmetic and the computed
table).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import _cpu
from ._batching import Foreign
from ._settings import Settings
from ._stats import percentile, ratio, summary
from ._workload import Prompts

Arm = Literal["local", "child", "split", "half"]
ARMS: tuple[Arm, ...] = ("local", "child", "split", "half")
#: Every ratio is this arm's figure over the baseline's, same round.
BASELINE: Arm = "local"
#: The arms whose model talks to RPC workers.
RPC_ARMS: tuple[Arm, ...] = ("split", "half")

#: Threads of every engine and every worker unless C{--threads} says otherwise.
DEFAULT_THREADS = 1
#: How long a worker may take to listen (seconds).
WORKER_START_S = 60.0


@dataclass(frozen=True)
class Sizes:
    """What the part measures, for the full run or C{--quick}."""

    #: Rounds of the four arms (a multiple of four: every place equally often).
    rounds: int
    #: Tokens decoded per trial (greedy, ignore_eos).
    decode_tokens: int
    #: Words of every round's prompt (about one token each on the demo model).
    prompt_words: int


def sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(rounds=4, decode_tokens=16, prompt_words=60)
    return Sizes(rounds=12, decode_tokens=64, prompt_words=190)


def half_layers(layers: int) -> int:
    """
    C{--gpu-layers} that offloads half the repeating layers: C{layers} is
    llama.cpp's count (the repeating layers and the output layer, 31 for
    the demo model), and llama.cpp offloads the output layer with the
    first one it offloads, then the repeating layers from the top down.
    """
    return (layers - 1) // 2 + 1


# -- ss and /proc --------------------------------------------------------------

#: The integer counters of C{ss -i} kept per connection.
SS_COUNTERS = (
    "bytes_sent",
    "bytes_retrans",
    "bytes_acked",
    "bytes_received",
    "segs_out",
    "segs_in",
    "data_segs_out",
    "data_segs_in",
)
_SS_FIELD = re.compile(r"(?<![\w/.])([a-z_]+):(\d+)(?![\d./:])")

Address = tuple[str, int]


@dataclass(frozen=True)
class Connection:
    """One TCP socket as C{ss -tin} shows it: its two ends and its counters."""

    local: Address
    peer: Address
    counters: dict[str, int]


def _address(text: str) -> Address | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def parse_ss(text: str) -> list[Connection]:
    """
    The sockets in C{ss -tinH} output: an address line (the state column
    optional, then the queues, the local and the peer address), then an
    indented line of C{key:value} details, of which the integer counters
    in L{SS_COUNTERS} are kept (a counter ss leaves out, as it does
    C{bytes_retrans} at zero, is 0).
    """
    out: list[Connection] = []
    ends: tuple[Address, Address] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            if ends is None:
                continue
            found = dict.fromkeys(SS_COUNTERS, 0)
            for key, value in _SS_FIELD.findall(line):
                if key in found:
                    found[key] = int(value)
            out.append(Connection(ends[0], ends[1], found))
            ends = None
            continue
        addresses = [a for a in map(_address, line.split()) if a is not None]
        ends = (addresses[0], addresses[1]) if len(addresses) >= 2 else None
    return out


def ss_connections() -> list[Connection]:
    """This machine's established TCP connections, from C{ss -tinH}."""
    got = subprocess.run(
        ["ss", "-tinH", "state", "established"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return parse_ss(got.stdout)


#: What one snapshot keeps: per worker port, per connection, its received bytes.
Snapshot = dict[int, dict[str, dict[tuple[Address, Address], int]]]


def wire_snapshot(connections: Sequence[Connection], ports: Sequence[int]) -> Snapshot:
    """
    Per worker port, each connection's C{bytes_received} at the worker's
    end (C{to}: what the worker received) and at the client's end
    (C{from}: what the client received from it). A byte is counted once,
    where it arrived (retransmissions are not).
    """
    snap: Snapshot = {p: {"to": {}, "from": {}} for p in ports}
    for c in connections:
        if c.local[1] in snap:
            snap[c.local[1]]["to"][(c.local, c.peer)] = c.counters["bytes_received"]
        elif c.peer[1] in snap:
            snap[c.peer[1]]["from"][(c.local, c.peer)] = c.counters["bytes_received"]
    return snap


def wire_delta(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """
    Bytes to and from the workers between two snapshots, per port and in
    all. A connection that is new in C{after} counts from zero; one gone
    from C{after} counts as nothing (its last bytes unseen), and is
    reported in C{lost} so a total that misses it can be told.
    """
    by_port: dict[str, dict[str, int]] = {}
    lost = 0
    for port, dirs in after.items():
        entry = {}
        for d in ("to", "from"):
            then = before.get(port, {}).get(d, {})
            now = dirs[d]
            entry[d] = sum(v - then.get(k, 0) for k, v in now.items())
            lost += sum(1 for k in then if k not in now)
        by_port[str(port)] = entry
    return {
        "to_workers": sum(e["to"] for e in by_port.values()),
        "from_workers": sum(e["from"] for e in by_port.values()),
        "by_port": by_port,
        "lost_connections": lost,
    }


def parse_proc_io(text: str) -> dict[str, int]:
    """C{/proc/PID/io}: its C{key: value} lines as integers."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip().isdigit():
            out[key.strip()] = int(value)
    return out


def proc_io(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/io") as f:
            return parse_proc_io(f.read())
    except OSError:
        return {}


def _cpu_s(pid: int | None) -> float:
    return sum(_cpu.thread_times(pid).values()) if pid is not None else 0.0


@dataclass
class Probe:
    """What an arm's counters are read from: its worker ports and its processes."""

    ports: tuple[int, ...] = ()
    child: int | None = None
    workers: tuple[int, ...] = ()

    def sample(self) -> dict[str, Any]:
        return {
            "wire": wire_snapshot(ss_connections(), self.ports) if self.ports else None,
            "io": [proc_io(p) for p in self.workers],
            "cpu": {
                "here": _cpu_s(os.getpid()),
                "child": _cpu_s(self.child),
                "workers": sum(_cpu_s(p) for p in self.workers),
            },
        }


def between(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two L{Probe.sample}s' difference: wire bytes, workers' rchar/wchar, CPU seconds."""
    io = {
        key: sum(y.get(key, 0) - x.get(key, 0) for x, y in zip(a["io"], b["io"], strict=True))
        for key in ("rchar", "wchar")
    }
    return {
        "wire": wire_delta(a["wire"], b["wire"]) if a["wire"] is not None else None,
        "workers_io": io if a["io"] else None,
        "cpu_s": {k: max(0.0, b["cpu"][k] - a["cpu"][k]) for k in a["cpu"]},
    }


# -- the protocol ----------------------------------------------------------------

#: enum rpc_cmd (ggml-rpc.cpp:61-81 in llama-cpp-python 0.3.36's llama.cpp).
COMMANDS = (
    "ALLOC_BUFFER",
    "GET_ALIGNMENT",
    "GET_MAX_SIZE",
    "BUFFER_GET_BASE",
    "FREE_BUFFER",
    "BUFFER_CLEAR",
    "SET_TENSOR",
    "SET_TENSOR_HASH",
    "GET_TENSOR",
    "COPY_TENSOR",
    "GRAPH_COMPUTE",
    "GET_DEVICE_MEMORY",
    "INIT_TENSOR",
    "GET_ALLOC_SIZE",
    "HELLO",
    "DEVICE_COUNT",
    "GRAPH_RECOMPUTE",
    "MEMSET_TENSOR",
)
#: The commands the server answers (rpc_serve_client, ggml-rpc.cpp:1820-2080);
#: the others are sent and not waited for (the dispatcher's send_async, or a
#: send with no output).
REPLIES = frozenset(
    {
        "HELLO",
        "DEVICE_COUNT",
        "ALLOC_BUFFER",
        "GET_ALLOC_SIZE",
        "GET_ALIGNMENT",
        "GET_MAX_SIZE",
        "BUFFER_GET_BASE",
        "SET_TENSOR_HASH",
        "GET_TENSOR",
        "COPY_TENSOR",
        "GET_DEVICE_MEMORY",
    }
)
REQUEST_HEAD = struct.Struct("<BQ")
REPLY_HEAD = struct.Struct("<Q")


def command_name(cmd: int) -> str:
    return COMMANDS[cmd] if 0 <= cmd < len(COMMANDS) else f"UNKNOWN_{cmd}"


class Frames:
    """
    A byte stream of C{| head | payload |} frames whose head (C{head},
    little-endian) ends with the payload's size: C{on_frame} is called
    with the head's fields as soon as the head is complete (the payload
    may still be on its way). Fed in chunks of any size.
    """

    def __init__(self, head: struct.Struct, on_frame: Callable[..., None]) -> None:
        self._head = head
        self._on_frame = on_frame
        self._buf = bytearray()
        self._skip = 0

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            take = min(self._head.size - len(self._buf), n - i)
            self._buf += data[i : i + take]
            i += take
            if len(self._buf) == self._head.size:
                fields = self._head.unpack(self._buf)
                self._buf.clear()
                self._skip = fields[-1]
                self._on_frame(*fields)

    @property
    def idle(self) -> bool:
        """Between frames (no head or payload half read)."""
        return not self._buf and not self._skip


class Tally:
    """
    Commands, replies and bytes per phase and command, over every
    connection of a L{Tap} (or several). C{phase} names what the bench is
    doing; a reply counts in the phase of its request.
    """

    def __init__(self) -> None:
        self.phase = "load"
        self._lock = threading.Lock()
        self.counts: dict[str, dict[str, dict[str, int]]] = {}
        self.last = time.monotonic()

    def _entry(self, phase: str, name: str) -> dict[str, int]:
        return self.counts.setdefault(phase, {}).setdefault(
            name, {"requests": 0, "request_bytes": 0, "replies": 0, "reply_bytes": 0}
        )

    def request(self, cmd: int, size: int) -> tuple[str, str]:
        name = command_name(cmd)
        with self._lock:
            phase = self.phase
            e = self._entry(phase, name)
            e["requests"] += 1
            e["request_bytes"] += REQUEST_HEAD.size + size
            self.last = time.monotonic()
        return phase, name

    def reply(self, phase: str, name: str, size: int) -> None:
        with self._lock:
            e = self._entry(phase, name)
            e["replies"] += 1
            e["reply_bytes"] += REPLY_HEAD.size + size
            self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def settle(self, quiet: float = 0.05, timeout: float = 5.0) -> None:
        """Wait until nothing has moved for C{quiet} seconds (at most C{timeout})."""
        deadline = time.monotonic() + timeout
        while time.monotonic() - self.last < quiet and time.monotonic() < deadline:
            time.sleep(quiet / 5)

    def totals(self, phase: str) -> dict[str, int]:
        """A phase's requests, replies (the round trips) and bytes each way."""
        with self._lock:
            entries = list(self.counts.get(phase, {}).values())
        return {
            key: sum(e[key] for e in entries)
            for key in ("requests", "request_bytes", "replies", "reply_bytes")
        }


class Exchange:
    """One connection's two directions parsed: requests, and the replies they wait for."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self._waiting: collections.deque[tuple[str, str]] = collections.deque()
        self.requests = Frames(REQUEST_HEAD, self._request)
        self.replies = Frames(REPLY_HEAD, self._reply)
        self.unmatched = 0

    def _request(self, cmd: int, size: int) -> None:
        phase, name = self.tally.request(cmd, size)
        if name in REPLIES:
            self._waiting.append((phase, name))

    def _reply(self, size: int) -> None:
        if not self._waiting:
            self.unmatched += 1
            self.tally.reply("?", "UNMATCHED", size)
            return
        phase, name = self._waiting.popleft()
        self.tally.reply(phase, name, size)


class Tap:
    """
    A loopback proxy in front of one worker that counts ggml-rpc's
    commands as it forwards them (L{Exchange} on each connection, all
    into one L{Tally}). Only for counting, off the clock: it adds a hop
    and Python's copies to every message.
    """

    def __init__(self, target: Address, tally: Tally) -> None:
        self.target = target
        self.tally = tally
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self.exchanges: list[Exchange] = []
        self._closed = False
        threading.Thread(target=self._accept, name=f"tap-{self.port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                conn.close()
                continue
            upstream.settimeout(None)
            for s in (conn, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [conn, upstream]
            ex = Exchange(self.tally)
            self.exchanges.append(ex)
            for src, dst, feed in ((conn, upstream, ex.requests), (upstream, conn, ex.replies)):
                threading.Thread(target=self._pump, args=(src, dst, feed), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, frames: Frames) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                frames.feed(data)
                dst.sendall(data)
                self.tally.touch()
        except OSError:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


# -- the workers -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_command(port: int, threads: int) -> list[str]:
    """C{ds4tw-rpc-worker} of this installation (beside its Python), or its module."""
    script = Path(sys.executable).with_name("ds4tw-rpc-worker")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "ds4tw._server.rpcworker"]
    return [*head, "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads)]


@dataclass
class Worker:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def workers(n: int, threads: int, logdir: Path) -> Iterator[list[Worker]]:
    """C{n} workers on loopback ports, listening; stopped (SIGTERM, then killed) on the way out."""
    from ds4tw._engine.rpc import Endpoint, WorkerDown, check_worker

    logdir.mkdir(parents=True, exist_ok=True)
    started: list[Worker] = []
    try:
        for _ in range(n):
            port = free_port()
            log_path = logdir / f"rpc-worker-{port}.log"
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(
                    worker_command(port, threads), stdout=out, stderr=subprocess.STDOUT
                )
            started.append(Worker(port, proc, log_path))
        for w in started:
            deadline = time.monotonic() + WORKER_START_S
            while True:
                if w.proc.poll() is not None:
                    raise RuntimeError(
                        f"ds4tw-rpc-worker on port {w.port} exited: "
                        + w.log_path.read_text(errors="replace")[-2000:]
                    )
                try:
                    check_worker(Endpoint("127.0.0.1", w.port), timeout=1.0)
                    break
                except WorkerDown:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        yield started
    finally:
        for w in started:
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in started:
            try:
                w.proc.wait(10)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()


# -- the engines ---------------------------------------------------------------------


def engine_kwargs(settings: Settings, threads: int, options: Any) -> dict[str, Any]:
    return dict(n_ctx=settings.ctx, n_batch=settings.batch, n_threads=threads, options=options)


def options(rpc: Sequence[str] = (), gpu_layers: int | Literal["all"] = 0) -> Any:
    """
    The arms' options: flash attention on for all (llama.cpp turns it on
    by itself once layers are offloaded and leaves it off on the CPU
    alone; on and off give different greedy text), no offload unless
    workers are given.
    """
    from ds4tw import EngineOptions

    if not rpc:
        return EngineOptions(gpu_layers=0, flash_attn="on")
    return EngineOptions(
        rpc=tuple(rpc), gpu_layers=gpu_layers, tensor_split=(1.0, 1.0), flash_attn="on"
    )


def in_child(path: str, kwargs: dict[str, Any]) -> Any:
    """The model in a child process, its prompt side here (as C{twistd ds4tw --rpc} runs it)."""
    from ds4tw import LlamaEngine, ProcessEngine, Recipe

    return ProcessEngine(LlamaEngine(path, **kwargs), Recipe(LlamaEngine, (path,), kwargs))


# -- a trial -----------------------------------------------------------------------------


def trial(engine: Any, prompt: Sequence[int], tokens: int, probe: Probe) -> dict[str, Any]:
    """
    One greedy turn of C{tokens} tokens on C{engine}: TTFT, the decode
    rate, and (read between the phases, off the clock) the probe's
    counters for the prefill and for the decode.
    """
    from ds4tw import AbortFlag, SamplingParams, Token, generate

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    ids: list[int] = []
    times: list[float] = []
    s0 = probe.sample()
    t0 = time.perf_counter()
    resumed = t0
    s1: dict[str, Any] | None = None
    for event in generate(engine, prompt, params, AbortFlag()):
        if not isinstance(event, Token):
            continue
        times.append(time.perf_counter())
        ids.append(event.id)
        if s1 is None:
            s1 = probe.sample()
            resumed = time.perf_counter()
    s2 = probe.sample()
    n = len(times)
    return {
        "prompt_tokens": len(prompt),
        "tokens": n,
        "ids": ids,
        "ttft_s": times[0] - t0 if times else None,
        "decode_tps": (n - 1) / (times[-1] - resumed) if n >= 2 and times[-1] > resumed else None,
        "prefill": between(s0, s1) if s1 is not None else None,
        "decode": between(s1, s2) if s1 is not None else None,
    }


def per_token(t: Mapping[str, Any], phase: str, direction: str) -> float | None:
    """A trial's wire bytes in C{phase} and C{direction}, per prompt token or decoded token."""
    got = t.get(phase) or {}
    wire = got.get("wire")
    if not wire:
        return None
    n = t["prompt_tokens"] if phase == "prefill" else (t["tokens"] or 0) - 1
    return wire[direction] / n if n > 0 else None


def per_turn(t: Mapping[str, Any], phase: str, direction: str) -> float | None:
    wire = (t.get(phase) or {}).get("wire")
    return float(wire[direction]) if wire else None


# -- the arithmetic ---------------------------------------------------------------------


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """L{summary} with the quartiles (C{p25}, C{p75}) beside it."""
    out = summary(values)
    clean = out.get("values") or []
    out["p25"] = percentile(clean, 25)
    out["p75"] = percentile(clean, 75)
    return out


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


#: The per-trial figures summarised per arm.
FIGURES = ("ttft_s", "decode_tps")
#: Wire figures: (name, phase, direction, per token or per turn).
WIRE: tuple[tuple[str, str, str, Callable[[Mapping[str, Any], str, str], float | None]], ...] = (
    ("prefill_to_workers_per_prompt_token", "prefill", "to_workers", per_token),
    ("prefill_from_workers_per_prompt_token", "prefill", "from_workers", per_token),
    ("prefill_to_workers_bytes", "prefill", "to_workers", per_turn),
    ("prefill_from_workers_bytes", "prefill", "from_workers", per_turn),
    ("decode_to_workers_per_token", "decode", "to_workers", per_token),
    ("decode_from_workers_per_token", "decode", "from_workers", per_token),
)


def cpu_ms_per_token(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Decode CPU per decoded token, summed over the trials, by process group."""
    tokens = sum(max(0, (t.get("tokens") or 0) - 1) for t in trials if t.get("decode"))
    if not tokens:
        return None
    out: dict[str, Any] = {}
    for key in ("here", "child", "workers"):
        out[key] = sum(t["decode"]["cpu_s"][key] for t in trials if t.get("decode")) / tokens * 1e3
    out["total"] = out["here"] + out["child"] + out["workers"]
    return out


def summarise(rounds: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """
    Per arm: TTFT and decode rate over the rounds, the wire bytes (RPC
    arms), the decode CPU per token, and how many rounds gave the
    baseline's tokens; then against L{BASELINE}: the paired ratio round by
    round (median and quartiles), and the ratio of the medians.
    """
    per: dict[str, Any] = {}
    for arm in ARMS:
        got = [r[arm] for r in rounds if arm in r]
        if not got:
            continue
        entry: dict[str, Any] = {key: spread([t.get(key) for t in got]) for key in FIGURES}
        entry["trials"] = len(got)
        entry["prompt_tokens"] = summary([t.get("prompt_tokens") for t in got])
        entry["same_tokens_as_baseline"] = sum(
            1 for r in rounds if arm in r and BASELINE in r and r[arm]["ids"] == r[BASELINE]["ids"]
        )
        if arm in RPC_ARMS:
            entry["wire"] = {name: spread([f(t, ph, d) for t in got]) for name, ph, d, f in WIRE}
            entry["workers_io_decode"] = {
                key: summary(
                    [((t.get("decode") or {}).get("workers_io") or {}).get(key) for t in got]
                )
                for key in ("rchar", "wchar")
            }
        entry["decode_cpu_ms_per_token"] = cpu_ms_per_token(got)
        per[arm] = entry
    vs: dict[str, Any] = {}
    for other in per:
        if other == BASELINE or BASELINE not in per:
            continue
        pairs = [(r[other], r[BASELINE]) for r in rounds if other in r and BASELINE in r]
        vs[other] = {
            key: spread([ratio(a.get(key), b.get(key)) for a, b in pairs]) for key in FIGURES
        }
        vs[other]["ttft_diff_ms"] = spread(
            [
                None
                if a.get("ttft_s") is None or b.get("ttft_s") is None
                else (a["ttft_s"] - b["ttft_s"]) * 1e3
                for a, b in pairs
            ]
        )
        vs[other]["of_medians"] = {
            key: ratio(per[other][key]["median"], per[BASELINE][key]["median"]) for key in FIGURES
        }
    return {"per_arm": per, "vs_baseline": vs}


# -- the computed network cost ------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A network, for the computed table: its round trip, its rate, its framing overhead."""

    name: str
    rtt_s: float
    bits_per_s: float
    #: On-the-wire bytes per payload byte (headers of each packet).
    framing: float


#: Ethernet: 1460 bytes of TCP payload in 1538 on the wire (preamble, gap,
#: Ethernet, IP, TCP headers). WireGuard: a 1420-byte MTU holds 1368 bytes
#: of TCP payload (IP + TCP with timestamps, 52), sent in 1518 bytes on the
#: wire (WireGuard's 32, UDP 8, IP 20, Ethernet 38).
LINKS = (
    Link("1 GbE LAN, 0.2 ms RTT", 0.0002, 1e9, 1538 / 1460),
    Link("WireGuard, 5 ms RTT, 1 Gbit/s", 0.005, 1e9, 1518 / 1368),
    Link("WireGuard, 5 ms RTT, 100 Mbit/s", 0.005, 1e8, 1518 / 1368),
)


def link_seconds(link: Link, payload_bytes: float, round_trips: float) -> float:
    """What a link adds: the round trips' waits and the bytes' time on the wire, in sequence."""
    return round_trips * link.rtt_s + payload_bytes * link.framing * 8 / link.bits_per_s


def network_table(
    parts: Mapping[str, Any],
    local_decode_tps: float | None,
    local_ttft_s: float | None,
    links: Sequence[Link] = LINKS,
) -> list[dict[str, Any]]:
    """
    Computed, not measured: per link, what the network adds to a decoded
    token, to a prompt's prefill and to a turn's graph uploads
    (L{decompose}'s C{parts}; the replies waited for one after the other,
    as the layers run, and the bytes at the link's rate), and the decode
    rate and TTFT if the machines computed as fast as the local baseline
    did here and the network were the only cost added.
    """
    rows = []
    for link in links:
        per_token = link_seconds(
            link, parts["decode_bytes_per_token"], parts["decode_round_trips_per_token"]
        )
        prefill = link_seconds(link, parts["prefill_bytes"], parts["prefill_round_trips"])
        rows.append(
            {
                "link": link.name,
                "rtt_ms": link.rtt_s * 1e3,
                "mbit_s": link.bits_per_s / 1e6,
                "framing": link.framing,
                "decode_added_ms_per_token": per_token * 1e3,
                "decode_tps_at_local_compute": (
                    1.0 / (1.0 / local_decode_tps + per_token) if local_decode_tps else None
                ),
                "prefill_added_ms": prefill * 1e3,
                "ttft_s_at_local_compute": (
                    local_ttft_s + prefill if local_ttft_s is not None else None
                ),
                "graph_uploads_added_ms": link_seconds(link, parts["decode_graph_bytes"], 0) * 1e3,
            }
        )
    return rows


# -- the counted pass ---------------------------------------------------------------------


def trace(
    load: Callable[[Sequence[str]], Any],
    targets: Sequence[Worker],
    prompt: Sequence[int],
    tokens: int,
) -> dict[str, Any]:
    """
    One turn of a model loaded through a L{Tap} in front of each of
    C{targets} (C{load(endpoints)} loads it): commands, replies and bytes
    per phase (load, prefill, decode) from the protocol, and the same
    turn's bytes from C{ss} on the taps' ports as a check.
    """
    from ds4tw import AbortFlag, SamplingParams, Token, generate

    tally = Tally()
    taps = [Tap(("127.0.0.1", w.port), tally) for w in targets]
    try:
        engine = load([f"127.0.0.1:{t.port}" for t in taps])
        try:
            ports = [t.port for t in taps]
            tally.settle()
            tally.phase = "idle"
            s0 = wire_snapshot(ss_connections(), ports)
            tally.phase = "prefill"
            params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
            n = 0
            s1 = s0
            for event in generate(engine, prompt, params, AbortFlag()):
                if not isinstance(event, Token):
                    continue
                n += 1
                if n == 1:
                    tally.settle()
                    s1 = wire_snapshot(ss_connections(), ports)
                    tally.phase = "decode"
            tally.settle()
            s2 = wire_snapshot(ss_connections(), ports)
            tally.phase = "after"
        finally:
            engine.close()
        tally.settle()
    finally:
        for t in taps:
            t.close()
    phases = {}
    for phase, count in (("load", None), ("prefill", len(prompt)), ("decode", n - 1)):
        totals = tally.totals(phase)
        entry: dict[str, Any] = {"totals": totals, "by_command": tally.counts.get(phase, {})}
        if count:
            entry["per_token"] = {k: v / count for k, v in totals.items()}
        phases[phase] = entry
    return {
        "prompt_tokens": len(prompt),
        "tokens": n,
        "phases": phases,
        "ss_check": {"prefill": wire_delta(s0, s1), "decode": wire_delta(s1, s2)},
        "unmatched_replies": sum(ex.unmatched for t in taps for ex in t.exchanges),
        "connections": sum(len(t.exchanges) for t in taps),
    }


def decompose(counted: Mapping[str, Any]) -> dict[str, Any]:
    """
    A counted turn (L{trace}) as the network model takes it. Per decoded
    token: the steady bytes each way (the decode's bytes without its
    C{GRAPH_COMPUTE}s) and the replies waited for. Per turn: the prefill's
    bytes and replies, and the decode's C{GRAPH_COMPUTE}s (a whole graph
    sent again because its shape changed: the first step after a prefill,
    and whenever the KV's view grows), which are per turn, not per token.
    """
    phases = counted["phases"]
    decode, prefill = phases["decode"], phases["prefill"]
    n = max(1, counted["tokens"] - 1)
    graph = decode["by_command"].get("GRAPH_COMPUTE", {})
    graph_bytes = graph.get("request_bytes", 0)
    up = decode["totals"]["request_bytes"] - graph_bytes
    down = decode["totals"]["reply_bytes"]
    turn = prefill["totals"]["request_bytes"] + prefill["totals"]["reply_bytes"] + graph_bytes
    return {
        "prompt_tokens": counted["prompt_tokens"],
        "decoded_tokens": counted["tokens"],
        "decode_to_workers_per_token": up / n,
        "decode_from_workers_per_token": down / n,
        "decode_bytes_per_token": (up + down) / n,
        "decode_round_trips_per_token": decode["totals"]["replies"] / n,
        "decode_requests_per_token": (decode["totals"]["requests"] - graph.get("requests", 0)) / n,
        "decode_graph_uploads": graph.get("requests", 0),
        "decode_graph_bytes": graph_bytes,
        "prefill_bytes": prefill["totals"]["request_bytes"] + prefill["totals"]["reply_bytes"],
        "prefill_round_trips": prefill["totals"]["replies"],
        "turn_bytes": turn,
    }


# -- the measurement ----------------------------------------------------------------------


def _record(t: Mapping[str, Any]) -> dict[str, Any]:
    """A trial as the JSON keeps it: its first token ids only."""
    out = {k: v for k, v in t.items() if k != "ids"}
    out["ids_start"] = list(t.get("ids") or [])[:8]
    return out


def measure(
    settings: Settings,
    workdir: Path,
    *,
    threads: int = DEFAULT_THREADS,
    mark: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The whole part: four workers, the four arms loaded, warm-up, the rounds, the counted pass."""
    import ds4tw._engine.rpc as rpc
    from ds4tw import LlamaEngine

    if not rpc.available():
        rpc.library()  # raises RPCUnavailable, with the command that installs a build with RPC
    sz = sizes(settings.quick)
    path = str(settings.model)
    prompts = Prompts(settings.seed + 23)
    started = time.perf_counter()
    engines: dict[str, Any] = {}
    probes: dict[str, Probe] = {}
    loads: dict[str, float] = {}
    rounds: list[dict[str, dict[str, Any]]] = []
    foreign = Foreign()
    with workers(4, threads, workdir) as ws, contextlib.ExitStack() as stack:
        split_ws, half_ws = ws[:2], ws[2:]

        def load(arm: str, engine: Any) -> Any:
            t0 = time.perf_counter()
            engine.load()
            loads[arm] = time.perf_counter() - t0
            stack.callback(engine.close)
            engines[arm] = engine
            return engine

        mark("rpc: loading")
        local = load(BASELINE, LlamaEngine(path, **engine_kwargs(settings, threads, options())))
        layers = int(local.settings.get("layers") or 0)
        half = half_layers(layers)
        probes[BASELINE] = Probe()
        child = load("child", in_child(path, engine_kwargs(settings, threads, options())))
        probes["child"] = Probe(child=child.pid)
        offload: dict[str, int | Literal["all"]] = {"split": "all", "half": half}
        for arm, group in (("split", split_ws), ("half", half_ws)):
            gpu = offload[arm]
            kwargs = engine_kwargs(settings, threads, options([w.endpoint for w in group], gpu))
            e = load(arm, in_child(path, kwargs))
            probes[arm] = Probe(
                ports=tuple(w.port for w in group),
                child=e.pid,
                workers=tuple(w.proc.pid for w in group),
            )
        settings_of = {arm: dict(e.settings) for arm, e in engines.items()}
        mark("rpc: warm-up")
        warm = local.tokenize(prompts.words(24))
        for arm in ARMS:
            trial(engines[arm], warm, 8, probes[arm])
        mark("rpc: rounds")
        for r in range(sz.rounds):
            prompt = local.tokenize(prompts.words(sz.prompt_words))
            got: dict[str, dict[str, Any]] = {}
            for arm in rotate(ARMS, r):
                noise = foreign.sample()
                got[arm] = trial(engines[arm], prompt, sz.decode_tokens, probes[arm])
                got[arm]["foreign_cores"] = foreign.since(noise)
                got[arm]["round"] = r
            rounds.append(got)
        rounds_s = time.perf_counter() - started
        mark("rpc: counted pass")
        # The timed models let go of their workers (one client at a time),
        # then each RPC arm is loaded again through the taps.
        for arm in RPC_ARMS:
            engines.pop(arm).close()
        traced: dict[str, Any] = {}
        prompt = local.tokenize(prompts.words(sz.prompt_words))
        for arm, group in (("split", split_ws), ("half", half_ws)):

            def load_traced(
                endpoints: Sequence[str], gpu: int | Literal["all"] = offload[arm]
            ) -> Any:
                e = in_child(path, engine_kwargs(settings, threads, options(endpoints, gpu)))
                e.load()
                return e

            traced[arm] = trace(load_traced, group, prompt, sz.decode_tokens)
    out = summarise(rounds)
    base = out["per_arm"].get(BASELINE, {})
    computed: dict[str, Any] = {}
    for arm in RPC_ARMS:
        if arm not in traced:
            continue
        parts = decompose(traced[arm])
        computed[arm] = {
            **parts,
            "links": network_table(
                parts,
                base.get("decode_tps", {}).get("median"),
                base.get("ttft_s", {}).get("median"),
            ),
        }
    out.update(
        {
            "baseline": BASELINE,
            "arms": list(ARMS),
            "sizes": dataclasses.asdict(sz),
            "threads": {"engine": threads, "each_worker": threads},
            "half_gpu_layers": half,
            "layers": layers,
            "load_s": loads,
            "engine_settings": settings_of,
            "rounds_s": rounds_s,
            "counted": traced,
            "computed_network": computed,
            "links": [dataclasses.asdict(link) for link in LINKS],
            "foreign_cores": summary([t.get("foreign_cores") for r in rounds for t in r.values()]),
            "rounds": [{arm: _record(t) for arm, t in r.items()} for r in rounds],
            "where": (
                f"{path}; n_ctx {settings.ctx}, n_batch {settings.batch}, {threads} thread(s) "
                f"per engine and per worker; flash attention on in every arm; workers: "
                f"ds4tw-rpc-worker --threads {threads} on 127.0.0.1"
            ),
            "source": (
                "wire bytes: ss -tinH bytes_received at each end of the connections to the "
                "workers' ports (kernel, exact; retransmissions not counted); round trips: "
                "ggml-rpc's protocol parsed by a loopback proxy in a separate, untimed pass; "
                "CPU: /proc/PID/task/*/stat"
            ),
            "notes": [
                "workers' /proc/PID/io rchar and wchar are recorded beside the ss counts: they "
                "count read()/write() only, and ggml-rpc uses send()/recv(), so they miss the "
                "socket traffic",
                "the computed_network tables are arithmetic on the measured bytes and counted "
                "round trips, not measurements on those links",
            ],
        }
    )
    return out


# -- the printed summary ---------------------------------------------------------------


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(got: Mapping[str, Any] | None) -> list[str]:
    """The part's lines for the printed summary."""
    if not got:
        return []
    per, vs = got["per_arm"], got["vs_baseline"]
    lines = ["rpc (a model over loopback workers; ratios to local, paired, [quartiles]):"]
    for arm in ARMS:
        if arm not in per:
            continue
        p = per[arm]
        line = (
            f"  {arm:6s} TTFT {_f(p['ttft_s']['median'], '.3f')} s, "
            f"decode {_f(p['decode_tps']['median'], '.1f')} tok/s"
        )
        if arm in vs:
            for key, label in (("ttft_s", "TTFT"), ("decode_tps", "decode")):
                s = vs[arm][key]
                line += (
                    f"; {label} x{_f(s['median'], '.3f')} "
                    f"[{_f(s['p25'], '.3f')}, {_f(s['p75'], '.3f')}]"
                )
        line += f"; same tokens {p['same_tokens_as_baseline']}/{p['trials']}"
        lines.append(line)
        wire = p.get("wire")
        if wire:
            lines.append(
                "         bytes/token: prefill "
                f"{_f(wire['prefill_to_workers_per_prompt_token']['median'], ',.0f')} to, "
                f"{_f(wire['prefill_from_workers_per_prompt_token']['median'], ',.0f')} from; "
                f"decode {_f(wire['decode_to_workers_per_token']['median'], ',.0f')} to, "
                f"{_f(wire['decode_from_workers_per_token']['median'], ',.0f')} from"
            )
        c = got.get("computed_network", {}).get(arm)
        if c:
            lines.append(
                f"         counted: {_f(c['decode_round_trips_per_token'], '.2f')} round trips "
                f"and {_f(c['decode_bytes_per_token'], ',.0f')} bytes per decoded token; "
                f"prefill {_f(c['prefill_round_trips'], '.0f')} round trips, "
                f"{_f(c['prefill_bytes'], ',.0f')} bytes; {c['decode_graph_uploads']} graph "
                f"uploads in the decode, {_f(c['decode_graph_bytes'], ',.0f')} bytes"
            )
            for row in c["links"]:
                lines.append(
                    f"         computed, {row['link']}: +{row['decode_added_ms_per_token']:.2f} "
                    f"ms/token, +{row['prefill_added_ms']:.1f} ms prefill, "
                    f"+{row['graph_uploads_added_ms']:.1f} ms graph uploads"
                )
    return lines
