"""
ds4tw behind the real HAProxy and nginx (Debian's packages; .ci/run
installs them). Each proxy runs as its own foreground process on a free
loopback port, from the templates in docs/deploy/ (the same files the
deployment guide shows), filled in here. ds4tw runs as `twistd -n ds4tw`
through the integration tests' helpers.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Twistd, free_port, start_twistd, stop_twistd

__all__ = ["Proxy", "Twistd", "free_port", "start_proxy", "start_twistd", "stop_twistd"]

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
KINDS = ("haproxy", "nginx")


def fill(template: str, **values: str) -> str:
    """Replace every {{name}}; a missing value is an error."""
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def proxy_config(kind: str, port: int, idle_timeout: float, backends: list[int]) -> str:
    template = (
        DEPLOY / ("haproxy.cfg.tmpl" if kind == "haproxy" else "nginx.conf.tmpl")
    ).read_text()
    timeout = f"{int(idle_timeout * 1000)}ms"
    if kind == "haproxy":
        return fill(
            template,
            listen=f"127.0.0.1:{port}",
            idle_timeout=timeout,
            servers_leastconn="\n".join(
                f"    server r{i} 127.0.0.1:{p} check" for i, p in enumerate(backends)
            ),
            servers_affinity="\n".join(
                f"    server r{i} 127.0.0.1:{p} track ds4tw_leastconn/r{i}"
                for i, p in enumerate(backends)
            ),
        )
    return fill(
        template,
        listen=f"127.0.0.1:{port}",
        idle_timeout=timeout,
        servers="\n".join(
            f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in backends
        ),
    )


@dataclass
class Proxy:
    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_proxy(kind: str, tmp: Path, idle_timeout: float, backends: list[int]) -> Proxy:
    binary = shutil.which(kind) or shutil.which(kind, path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        pytest.fail(f"{kind} is not installed (.ci/run installs it: apt-get install {kind})")
    port = free_port()
    tmp.chmod(0o755)  # nginx's workers read nothing here, but may drop root
    conf = tmp / f"{kind}.conf"
    conf.write_text(proxy_config(kind, port, idle_timeout, backends))
    log = tmp / f"{kind}.log"
    if kind == "haproxy":
        # -db: foreground, no daemon; logs of the health checks on stderr.
        cmd = [binary, "-db", "-f", str(conf)]
    else:
        main = f"daemon off; pid {tmp / 'nginx.pid'}; error_log {tmp / 'error.log'} info;"
        if os.geteuid() == 0:
            main += " user root;"  # workers keep access to the temp dir
        cmd = [binary, "-e", str(tmp / "error.log"), "-c", str(conf), "-g", main]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    proxy = Proxy(kind, proc, port, log if kind == "haproxy" else tmp / "error.log")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{kind} exited with {proc.returncode}:\n{proxy.log_text()}")
        try:
            httpx.get(proxy.url + "/health", timeout=1)
            return proxy
        except httpx.HTTPError:
            time.sleep(0.05)
    stop_proxy(proxy)
    raise AssertionError(f"{kind} did not start:\n{proxy.log_text()}")


def stop_proxy(proxy: Proxy) -> None:
    # SIGTERM: a fast stop for both (haproxy: hard stop; nginx: fast shutdown).
    proxy.proc.send_signal(signal.SIGTERM)
    try:
        proxy.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proxy.proc.kill()
        proxy.proc.wait()


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """start(kind, idle_timeout, backends): a proxy stopped at teardown."""
    started: list[Proxy] = []

    def start(kind: str, idle_timeout: float, backends: list[int]) -> Proxy:
        d = tmp_path / f"{kind}-{len(started)}"
        d.mkdir()
        p = start_proxy(kind, d, idle_timeout, backends)
        started.append(p)
        return p

    yield start
    for p in started:
        stop_proxy(p)
