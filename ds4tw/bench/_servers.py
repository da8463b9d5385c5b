"""
Server subprocesses: ds4tw under twistd, the peer (llama_cpp.server), and
ds4tw on the scripted engine; each on a free loopback port, each logging
to its own file, each always stopped (SIGTERM, then SIGKILL after a
bound) however the measurement that used it ended.

Subprocesses rather than threads of the bench process: the servers must
not share the bench's GIL, and their RSS must be their own.

Covered by tests/integration/test_bench_smoke.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ._client import HOST, get
from ._settings import Settings

#: How long a server may take to load its model and answer (seconds).
READY_TIMEOUT = 180.0
#: How long a server may take to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 30.0


class ServerFailed(RuntimeError):
    """A server exited or never became ready; the message has its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    #: The server's own log (twistd's log file, or the peer's output).
    log_path: Path
    command: list[str]
    ready_path: str
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        try:
            import psutil

            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except ImportError:  # pragma: no cover - psutil is in the bench extra
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
            raise

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_since(0)[-chars:]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Seconds until the ready path answered 200; raises L{ServerFailed}."""
        start = time.perf_counter()
        deadline = start + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if get(self.port, self.ready_path, timeout=2)[0] == 200:
                    return time.perf_counter() - start
            except OSError:
                pass
            time.sleep(0.1)
        raise ServerFailed(f"{self.name} was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to C{timeout}, then SIGKILL. Returns the exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=timeout)
        finally:
            for f in self._files:
                f.close()
            self._files.clear()
        return self.proc.returncode


def _spawn(
    name: str,
    command: list[str],
    workdir: Path,
    port: int,
    log: Path,
    ready_path: str,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    out = open(workdir / f"{name}.out", "wb")  # noqa: SIM115 - closed by stop()
    try:
        proc = subprocess.Popen(
            command,
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    except BaseException:
        out.close()
        raise
    return ServerProcess(name, proc, port, log, command, ready_path, [out])


@contextmanager
def running(server: ServerProcess, timeout: float = READY_TIMEOUT) -> Iterator[ServerProcess]:
    """Wait until C{server} is ready; stop it on the way out, whatever happened."""
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


def ds4tw_twistd(
    settings: Settings,
    workdir: Path,
    name: str,
    *,
    keepalive: float = 15.0,
    max_queue: int = 128,
    chat_template: str | None = None,
    parallel: int | None = None,
    cache_ram_mb: int | None = None,
    kv_disk_dir: Path | None = None,
    abort_in_step: bool = True,
    source: Path | None = None,
    extra: Sequence[str] = (),
) -> ServerProcess:
    """
    C{twistd -n ds4tw} on the real model, as a user would run it
    (C{parallel}, C{cache_ram_mb}, C{kv_disk_dir}: its C{--parallel},
    C{--cache-ram-mb}, C{--kv-disk-dir}; None for the server's default;
    C{extra}: more of its options, such as C{--models FILE}).
    Without C{abort_in_step}, the same service with the in-step abort off,
    through L{ds4tw.bench._serve} (twistd has no option for it). With
    C{source}, the ds4tw of that source tree (another checkout, for an
    A/B of two versions in one run) instead of the one installed.
    """
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    args = [
        "--listen", f"tcp:{port}:interface={HOST}",
        "--ctx", str(settings.ctx),
        "--threads", str(settings.threads),
        "--batch", str(settings.batch),
        "--keepalive", str(keepalive),
        "--max-queue", str(max_queue),
    ]  # fmt: skip
    if settings.model:
        args += ["--model", settings.model]
    if parallel is not None:
        args += ["--parallel", str(parallel)]
    if cache_ram_mb is not None:
        args += ["--cache-ram-mb", str(cache_ram_mb)]
    if kv_disk_dir is not None:
        args += ["--kv-disk-dir", str(kv_disk_dir)]
    if chat_template is not None:
        template = workdir / f"{name}.jinja"
        template.write_text(chat_template, encoding="utf-8")
        args += ["--chat-template", str(template)]
    args += list(extra)
    if not abort_in_step:
        command = [
            sys.executable, "-m", "ds4tw.bench._serve",
            "--log", str(log), "--no-abort-in-step", "--", *args,
        ]  # fmt: skip
        return _spawn(name, command, workdir, port, log, "/health")
    # twistd through this interpreter: no dependence on where scripts live.
    command = [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "--nodaemon", "--pidfile=", f"--logfile={log}", "ds4tw", *args,
    ]  # fmt: skip
    # First on the path: its ds4tw package, and its twisted/plugins file
    # (twistd finds a plugin in every twisted/plugins on the path).
    env = None if source is None else {"PYTHONPATH": str(source)}
    return _spawn(name, command, workdir, port, log, "/health", env)


def ds4tw_scripted(
    settings: Settings,
    workdir: Path,
    name: str,
    *,
    keepalive: float = 15.0,
    max_queue: int = 128,
    think: bool = False,
) -> ServerProcess:
    """ds4tw on the paced scripted engine (L{ds4tw.bench._scripted_server})."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    command = [
        sys.executable, "-m", "ds4tw.bench._scripted_server",
        "--port", str(port), "--log", str(log),
        "--keepalive", str(keepalive), "--max-queue", str(max_queue),
        "--token-ms", str(settings.scripted_token_ms),
        "--prefill-ms", str(settings.scripted_prefill_ms),
        "--prefill-batch", str(settings.scripted_prefill_batch),
        "--ctx", str(settings.ctx),
    ]  # fmt: skip
    if think:
        command.append("--think")
    return _spawn(name, command, workdir, port, log, "/health")


def peer(settings: Settings, workdir: Path, model_path: str, name: str = "peer") -> ServerProcess:
    """
    C{python -m llama_cpp.server} with the same context, batch and threads,
    through L{ds4tw.bench._peer} (the AMX workaround).
    """
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "ds4tw.bench._peer",
        "--model", model_path, "--host", HOST, "--port", str(port),
        "--n_ctx", str(settings.ctx),
        "--n_batch", str(settings.batch), "--n_ubatch", str(settings.batch),
        "--n_threads", str(settings.threads), "--n_threads_batch", str(settings.threads),
    ]  # fmt: skip
    return _spawn(name, command, workdir, port, workdir / f"{name}.out", "/v1/models")
