"""
An engine whose model lives in a child process: L{ProcessEngine}.

Why: llama.cpp's RPC client (a model split over remote workers,
L{ds4tw._engine.rpc}) answers every failure of a worker with
C{GGML_ABORT}, which is C{abort()} of the whole process: a worker that
goes away mid-step would take the server, its sockets and every other
request with it. Here only the child dies; the parent sees its pipe close
and raises L{BackendLost} from the step, the worker fails the running
requests in their dialects' shapes, C{/health} turns 503, and the runner
loads the model again (a new child) with back-off
(L{ds4tw._runtime.runner}). llama-server's router mode, llama-swap and
Ollama keep their models in child processes for the same reason.

The split: the prompt side (L{Engine.prepare}, the tokenizer, the chat
template, the memory estimate) stays in this process, in C{front}, an
engine of the same model that is never loaded here, so templating and
tokenizing run on the reactor's helper threads as before. Everything the
model thread does (L{Engine.load}, L{Engine.open}, L{Engine.step},
L{Engine.release}, L{Engine.force}, L{Engine.close}) is a message to the
child, which runs the same engine class on its own model (built there by
C{recipe}, a picklable callable) and answers each message in turn: the
model thread waits for the answer as it would wait for C{llama_decode}.

The cancel path crosses too: the step's L{AbortFlag} is mirrored, while
the parent waits, into a two-byte buffer both processes map (an unlinked
temporary file), which the child's engine hands to llama.cpp's abort
callback as it would its own flag; so a lone disconnect still stops a
prefill batch or a decode step from inside, a few milliseconds later
(the parent looks every L{ABORT_POLL_S}).

A grammar's C{armed} callable (the tool-call parser disarming its trigger
inside a reasoning block) cannot cross a pipe: it is asked here before
each step and its answer sent with the step (it is asked once per token
either way: one token per sequence per step).

Covered by tests/integration/test_process_engine.py (a scripted engine and
the demo model in a child: same tokens, cancel inside a step, the child
killed mid-step) and tests/integration/test_rpc_split.py (RPC workers).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any, cast

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent, globalLogBeginner

from .interface import (
    AbortFlag,
    BackendLost,
    ChatPrompt,
    Engine,
    Failed,
    LoadAborted,
    LoadProgress,
    MemoryUse,
    SamplingParams,
    StepResult,
)
from .kvcache import CacheStats, PromptCache

__all__ = ["ABORT_POLL_S", "ProcessEngine", "Recipe", "SharedAbortFlag"]

log = Logger()

#: How often the parent, waiting for a step, looks at the step's abort
#: flag to mirror it into the child's (seconds). The wait itself ends as
#: soon as the answer arrives, whatever this is.
ABORT_POLL_S = 0.002

#: How long a closing child gets to save its slots and exit before it is
#: killed (seconds).
CLOSE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Recipe:
    """
    How the child builds its engine: C{factory(*args, **kwargs)}, with a
    L{PromptCache} made there from C{prompt_cache}'s keyword arguments
    (a cache holds threads and files: it is built where it is used).
    Picklable as long as C{factory} is a class or a module's function.
    """

    factory: Callable[..., Engine]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_cache: dict[str, Any] | None = None

    def __call__(self) -> Engine:
        kwargs = dict(self.kwargs)
        if self.prompt_cache is not None:
            kwargs["prompt_cache"] = PromptCache(**self.prompt_cache)
        return self.factory(*self.args, **kwargs)


class SharedAbortFlag(AbortFlag):
    """
    An L{AbortFlag} whose two bytes live in a mapping shared with another
    process: the parent sets it, the child's llama.cpp reads it.
    """

    __slots__ = ("_map",)

    def __init__(self, fd: int) -> None:
        self._map = mmap.mmap(fd, 2)
        self._buf = (ctypes.c_char * 2).from_buffer(self._map)

    @property
    def is_set(self) -> bool:
        return self._map[0] != 0


def _signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


class ProcessEngine:
    """
    An L{Engine} whose model runs in a child process (see the module
    docstring). C{front} answers the prompt side and the engine's shape
    (model_id, slots, n_ctx); C{recipe()}, called in the child, builds the
    engine that loads the model. C{diagnose}, when given, is asked (in
    the model thread) why the child died, for L{BackendLost}'s message
    (which RPC worker is down). C{step_timeout}: a step that has not
    answered in this many seconds is taken as a hung backend (a worker
    stuck without closing its socket): the child is killed and the step
    raises L{BackendLost}. C{probe}, when given, is asked every
    C{probe_interval} seconds while no request runs (L{Probed}): a
    backend found gone then is a loss too.
    """

    #: The prompt cache runs in the child; its tiers are not shown here.
    prompt_cache: PromptCache | None = None

    def __init__(
        self,
        front: Engine,
        recipe: Callable[[], Engine],
        *,
        diagnose: Callable[[], str | None] | None = None,
        step_timeout: float | None = None,
        probe: Callable[[], str | None] | None = None,
        probe_interval: float = 0.0,
    ) -> None:
        self.front = front
        self._probe = probe
        #: Seconds between two idle probes by the runner (L{Probed}); 0: none.
        self.probe_interval = probe_interval if probe is not None else 0.0
        self.model_id = front.model_id
        self._recipe = recipe
        self._diagnose = diagnose
        self.step_timeout = step_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._flag: SharedAbortFlag | None = None
        self._measured: MemoryUse | None = None
        self._settings: dict[str, Any] = {}
        self._stats = CacheStats()
        #: Each open sequence's grammar trigger guard (asked before each step).
        self._armed: dict[int, Callable[[], bool]] = {}
        #: The child's pid while it runs (tests kill it).
        self.pid: int | None = None
        #: Why the last child died (for calls made after it did).
        self._lost_message: str | None = None

    # -- the prompt side, here ----------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.front.n_ctx

    @property
    def n_vocab(self) -> int:
        return self.front.n_vocab

    @property
    def chat_template(self) -> str:
        return self.front.chat_template

    @property
    def slots(self) -> int:
        return self.front.slots

    @property
    def model_path(self) -> Any:
        # Only where the front has one (ollama's /api/show reads the file).
        return self.front.model_path  # type: ignore[attr-defined]

    def prepare(self) -> None:
        self.front.prepare()

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], **template_kwargs: Any
    ) -> ChatPrompt:
        return self.front.apply_chat_template(messages, **template_kwargs)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        return self.front.tokenize(text, add_bos=add_bos)

    def is_special(self, token: int) -> bool:
        check = getattr(self.front, "is_special", None)
        return bool(check(token)) if check is not None else False

    def memory(self) -> MemoryUse:
        return self._measured or self.front.memory()

    @property
    def settings(self) -> dict[str, Any]:
        return self._settings

    @property
    def cache_stats(self) -> CacheStats:
        return self._stats

    @property
    def loaded(self) -> bool:
        return self._proc is not None

    def probe(self) -> str | None:
        """
        Why the model is lost while no request runs (L{Probed}): its
        process ended, or C{probe} found its backend gone. Any thread.
        """
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is not None:
            return f"the model's process ended ({_signal_name(proc.returncode)})"
        return self._probe() if self._probe is not None else None

    # -- the model, there -----------------------------------------------------

    def load(self, progress: LoadProgress | None = None) -> None:
        self.front.prepare()
        assert self._proc is None, "loaded already: close() first"
        self._start()
        self._lost_message = None
        try:
            # A load's progress arrives as it goes: silence for a step's
            # timeout is a worker that took the connection and hangs.
            info = self._call(("load",), progress=progress, timeout=self.step_timeout)
        except BaseException:
            self._kill()
            raise
        self._measured, self._settings, self._stats = info

    def open(self, prompt: Sequence[int], params: SamplingParams) -> int:
        armed = None
        if params.grammar is not None and params.grammar.armed is not None:
            armed = params.grammar.armed
            params = dataclasses.replace(
                params, grammar=dataclasses.replace(params.grammar, armed=None)
            )
        seq: int = self._call(("open", list(prompt), params, armed is not None))
        if armed is not None:
            self._armed[seq] = armed
        return seq

    def step(self, abort: AbortFlag | None = None) -> StepResult:
        armed = {seq: bool(f()) for seq, f in self._armed.items()}
        result, self._stats = self._call(("step", armed), abort=abort, timeout=self.step_timeout)
        return result

    def release(self, seq: int, *, keep_output: bool = True) -> None:
        self._armed.pop(seq, None)
        if self._proc is None:
            return
        # A child found dead here is reported by the next step or open,
        # where the worker expects a loss: a release only ends a request.
        with contextlib.suppress(BackendLost):
            self._call(("release", seq, keep_output))

    def force(self, seq: int, tokens: Sequence[int]) -> None:
        self._call(("force", seq, list(tokens)))

    def close(self) -> None:
        self._armed.clear()
        if self._proc is None:
            return
        conn, proc = self._conn, self._proc
        assert conn is not None
        try:
            conn.send(("close",))
            if conn.poll(CLOSE_TIMEOUT_S):
                conn.recv()
        except (OSError, EOFError):
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(CLOSE_TIMEOUT_S)
        self._kill()

    # -- the child's life --------------------------------------------------------

    def _start(self) -> None:
        # The flag's two bytes: an unlinked temporary file both map.
        with tempfile.TemporaryFile() as f:
            f.write(b"\0\0")
            f.flush()
            flag_fd = os.dup(f.fileno())
        parent, child = Pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(child.fileno()), str(flag_fd)],
                pass_fds=(child.fileno(), flag_fd),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        self._flag = SharedAbortFlag(flag_fd)
        os.close(flag_fd)
        self._proc, self._conn, self.pid = proc, parent, proc.pid
        parent.send(self._recipe)

    def _kill(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        self.pid = None
        self._measured = None
        self._settings = {}
        self._armed.clear()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if conn is not None:
            conn.close()

    def _lost(self, why: str | None = None) -> BackendLost:
        """The child is gone (or is made to go): the L{BackendLost} to raise."""
        proc = self._proc
        status = "gone"
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)
            status = _signal_name(proc.poll())
        self._kill()
        found = self._diagnose() if self._diagnose is not None else None
        message = f"the model's process ended ({status})"
        if why:
            message = f"{why}: {message}"
        if found:
            message = f"{found}; {message}"
        self._lost_message = message
        log.error("ds4tw: {model}: {message}", model=self.model_id, message=message)
        return BackendLost(message)

    def _call(
        self,
        message: tuple[Any, ...],
        *,
        abort: AbortFlag | None = None,
        progress: LoadProgress | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send C{message} to the child and wait for its answer."""
        conn, flag = self._conn, self._flag
        if conn is None or flag is None:
            raise BackendLost(self._lost_message or "the model is not loaded")
        if abort is not None and abort.is_set:
            flag.set()
        else:
            flag.clear()
        try:
            conn.send(message)
        except OSError:
            raise self._lost() from None
        started = time.monotonic()
        while True:
            try:
                ready = conn.poll(ABORT_POLL_S if abort is not None else 0.1)
            except OSError:
                raise self._lost() from None
            if ready:
                try:
                    kind, value = conn.recv()
                except (EOFError, OSError):
                    raise self._lost() from None
                if kind == "log":
                    _relog(*value)
                    continue
                if kind == "progress":
                    started = time.monotonic()
                    if progress is not None and not progress(value):
                        self._kill()
                        raise LoadAborted()
                    continue
                if kind == "error":
                    raise value
                return value
            if abort is not None and abort.is_set:
                flag.set()
            if timeout is not None and time.monotonic() - started > timeout:
                assert self._proc is not None
                self._proc.kill()
                raise self._lost(f"no answer to a {message[0]} in {timeout:g} s, killed")


def _relog(level: str, namespace: str, text: str) -> None:
    """A log event from the child, in this process's log under its own namespace."""
    Logger(namespace=namespace).emit(LogLevel.lookupByName(level), "{text}", text=text)


#: The child's program: this module's L{main} (not C{-m}, which would
#: import this module a second time as C{__main__}).
_CHILD = "import sys; from ds4tw._engine.process import main; main(sys.argv[1:])"


# -- the child ---------------------------------------------------------------------


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


class _Pipe:
    """The child's end: sends from any of its threads (log events too), one at a time."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def recv(self) -> Any:
        return self.conn.recv()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            self.conn.send(message)

    def log(self, event: dict[str, Any]) -> None:
        """A log observer: the event, formatted, to the parent's log."""
        level = event.get("log_level", LogLevel.info)
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        # A parent that is gone has nobody to tell.
        with contextlib.suppress(OSError, ValueError):
            self.send(("log", (level.name, event.get("log_namespace", "-"), text)))


class _Child:
    """The child's side: one engine, one message at a time."""

    def __init__(self, conn: _Pipe, flag: SharedAbortFlag, engine: Engine) -> None:
        self.conn = conn
        self.flag = flag
        self.engine = engine
        self.armed: dict[int, list[bool]] = {}

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except EOFError:
                # The parent is gone: nothing to save for anyone.
                return
            kind = message[0]
            try:
                value = getattr(self, f"do_{kind}")(*message[1:])
            except Exception as e:  # Aborted among them, raised again in the parent
                self.conn.send(("error", _picklable(e)))
                continue
            try:
                self.conn.send(("ok", value))
            except Exception as e:  # an unpicklable event: say so, not hang
                self.conn.send(("error", RuntimeError(f"cannot send the answer: {e}")))
            if kind == "close":
                return

    def do_load(self) -> tuple[MemoryUse, dict[str, Any], CacheStats]:
        def progress(fraction: float) -> bool:
            self.conn.send(("progress", fraction))
            return True

        self.engine.load(progress)
        settings = getattr(self.engine, "settings", {})
        return self.engine.memory(), dict(settings), self.engine.cache_stats

    def do_open(self, prompt: list[int], params: SamplingParams, guarded: bool) -> int:
        cell = [True]
        if guarded and params.grammar is not None:
            grammar = dataclasses.replace(params.grammar, armed=lambda: cell[0])
            params = dataclasses.replace(params, grammar=grammar)
        seq = self.engine.open(prompt, params)
        if guarded:
            self.armed[seq] = cell
        return seq

    def do_step(self, armed: dict[int, bool]) -> tuple[StepResult, CacheStats]:
        for seq, value in armed.items():
            if seq in self.armed:
                self.armed[seq][0] = value
        result = self.engine.step(self.flag)
        events = tuple(
            (seq, Failed(_picklable(e.error)) if isinstance(e, Failed) else e)
            for seq, e in result.events
        )
        return dataclasses.replace(result, events=events), self.engine.cache_stats

    def do_release(self, seq: int, keep_output: bool) -> None:
        self.armed.pop(seq, None)
        self.engine.release(seq, keep_output=keep_output)

    def do_force(self, seq: int, tokens: list[int]) -> None:
        self.engine.force(seq, tokens)

    def do_close(self) -> None:
        self.engine.close()


def main(argv: Sequence[str]) -> None:
    """The child: C{main([CONN_FD, FLAG_FD])} (L{_CHILD})."""
    # The parent handles ^C and SIGTERM: its drain lets the running
    # requests finish, then closes us. Both reach the whole group (a
    # terminal's ^C; systemd's stop signals every process of the unit),
    # and must not kill the model under a draining server. A parent that
    # dies is seen as the pipe's end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = _Pipe(Connection(int(argv[0])))
    flag = SharedAbortFlag(int(argv[1]))
    os.close(int(argv[1]))
    # What the engine logs (the load, the workers, warnings) goes to the
    # server's log, as if it had run there.
    globalLogBeginner.beginLoggingTo([cast(ILogObserver, conn.log)], redirectStandardIO=False)
    recipe = conn.recv()
    try:
        engine = recipe()
    except Exception as e:
        # Answer the load that will come with why the engine cannot be.
        conn.recv()
        conn.send(("error", _picklable(e)))
        return
    _Child(conn, flag, engine).serve()
