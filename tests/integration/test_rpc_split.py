"""
A model split over llama.cpp RPC workers, end to end with real
processes: two C{ds4tw-rpc-worker}s on loopback ports and C{twistd -n
ds4tw --rpc A,B} holding the demo model's layers over them and its own
CPU. The split gives the same greedy text as the model run in one
process; a worker killed mid-stream ends that stream with the dialect's
error frame, C{/health} and new requests get 503 while the model is out,
and once the worker is back the server reloads by itself and answers as
before. A worker that is down when the server starts is a clear error
naming it, and the server exits.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from ds4tw._engine.rpc import Endpoint, WorkerDown, check_worker

from .conftest import BIN, Twistd, free_port, sse_lines, start_twistd, stop_twistd, unique_words
from .test_keepalive_cancel import CANCEL_LINE, DONE_LINE, SLACK, K

#: The demo model has 30 layers and its output layer: 20 go to the workers
#: (10 each), the rest stay on this machine's CPU.
#: Flash attention on for both: with layers offloaded it is llama.cpp's
#: auto, which turns it on, and on the CPU alone it is off unless asked;
#: on and off give different greedy text (docs/models.md), which is not
#: what this compares.
COMMON = ("--ctx", "4096", "--threads", "1", "--flash-attn", "on")
#: Steps of 64 tokens: a prefill step over the workers takes ~0.4 s here,
#: far inside STEP_TIMEOUT even on a busy machine.
BATCH = 64
#: Idle probes every second (default 5): a worker that dies between requests.
PROBE_S = 1
SPLIT = (
    "--gpu-layers", "20", "--tensor-split", "1,1", "--keepalive", str(K),
    "--batch", str(BATCH), "--rpc-probe", str(PROBE_S), *COMMON,
)  # fmt: skip
#: A step of the demo model takes milliseconds to a second here: a worker
#: that has not answered in this long is hung.
STEP_TIMEOUT = 5
QUESTIONS = ("What is the capital of France?", "Name three rivers of Europe.")


class Worker:
    """A ds4tw-rpc-worker process on a loopback port."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = Endpoint("127.0.0.1", self.port)
        self.log = tmp / f"worker-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "ds4tw-rpc-worker"), "--port", str(self.port), "--threads", "1"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                check_worker(self.endpoint, timeout=1.0)
                return self
            except WorkerDown:
                time.sleep(0.05)
        raise AssertionError(f"the worker did not listen:\n{self.log.read_text()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def greedy(server: Twistd, question: str, max_tokens: int = 24) -> str:
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
    )
    return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    tmp = tmp_path_factory.mktemp("workers")
    started = [Worker(tmp).start(), Worker(tmp).start()]
    yield started
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The reference: the same model, the same options, all in one process."""
    server = start_twistd(tmp_path_factory.mktemp("local"), *COMMON)
    try:
        yield {q: greedy(server, q) for q in QUESTIONS}
    finally:
        stop_twistd(server)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory, workers: list[Worker]) -> Iterator[Twistd]:
    rpc = ",".join(str(w.endpoint) for w in workers)
    server = start_twistd(
        tmp_path_factory.mktemp("split"), "--rpc", rpc, "--rpc-timeout", str(STEP_TIMEOUT), *SPLIT
    )
    yield server
    stop_twistd(server)


def test_the_split_gives_the_same_greedy_text(
    split: Twistd, workers: list[Worker], local: dict[str, str]
) -> None:
    for question, want in local.items():
        assert greedy(split, question) == want
    health = httpx.get(split.url + "/health").json()
    engine = health["engine"]
    # 20 layers on the workers' devices, the rest here; each worker logged.
    assert engine["layers_offloaded"] == 20, engine
    assert [w["endpoint"] for w in engine["rpc"]] == [str(w.endpoint) for w in workers]
    assert all(w["total_bytes"] > 0 for w in engine["rpc"])
    log = split.log_text()
    for w in workers:
        assert f"RPC worker {w.endpoint}: device" in log and "MiB free of" in log


def test_over_rpc_the_stream_keeps_alive_and_a_cancel_ends_the_prefill(split: Twistd) -> None:
    """
    The two promises with the layers over workers: a long prefill's stream
    is never silent longer than K (plus the slack tests/integration/
    test_keepalive_cancel.py measured), and a hang-up during it stops the
    work before the next batch. Inside a batch, llama.cpp's abort callback
    reaches the local CPU's part of the graph only: a split sent to a
    worker runs to its end, so the bound here is one batch, not the
    quarter batch of the model in one process.
    """
    split.wait_idle()
    offset = len(split.log_text())
    url = split.url + "/v1/chat/completions"
    sse_lines(
        url,
        {
            "messages": [{"role": "user", "content": unique_words(300, seed=21)}],
            "max_tokens": 1,
            "stream": True,
        },
    )
    split.wait_idle()
    done = DONE_LINE.findall(split.log_text()[offset:])
    assert done, split.log_text()[offset:]
    prompt, cached, prefill_s = int(done[-1][0]), int(done[-1][1]), float(done[-1][2])
    batch_ms = prefill_s / -(-(prompt - cached) // BATCH) * 1000

    def hang_up(lines: list[tuple[float, str]]) -> bool:
        said_prefill = any(line == ": prefill" for _, line in lines)
        return (said_prefill and lines[-1][0] >= 2 * K) or not lines[-1][1].startswith(":")

    offset = len(split.log_text())
    lines = sse_lines(
        url,
        {
            "messages": [{"role": "user", "content": unique_words(1500, seed=22)}],
            "max_tokens": 5,
            "stream": True,
        },
        stop_after=hang_up,
    )
    assert all(line.startswith(":") for _, line in lines), lines
    gaps = [b - a for (a, _), (b, _) in zip([(0.0, ""), *lines], lines, strict=False)]
    assert max(gaps) < K + SLACK, gaps
    split.wait_idle(timeout=10)
    deadline = time.monotonic() + 10
    while not (found := CANCEL_LINE.findall(split.log_text()[offset:])):
        assert time.monotonic() < deadline, split.log_text()[offset:]
        time.sleep(0.05)
    stage, latency_ms = found[-1][0], float(found[-1][1])
    assert stage == "prefill"
    assert latency_ms < batch_ms + 250, (latency_ms, batch_ms)


def stream_raw(url: str, question: str, kill: Worker, sig: int = signal.SIGKILL) -> list[str]:
    """Stream a long answer, sending C{kill} C{sig} after the third content chunk."""
    payload = {
        "model": "demo",
        "stream": True,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 400,
        "temperature": 0,
    }
    lines: list[str] = []
    content = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line[6:])
            if '"content"' in line:
                content += 1
                if content == 3:
                    assert kill.proc is not None
                    kill.proc.send_signal(sig)
                    if sig == signal.SIGKILL:
                        kill.proc.wait()
    return lines


def wait_healthy(server: Twistd, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(server.url + "/health").status_code != 200:
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.2)


def test_a_worker_killed_mid_stream_fails_it_then_the_server_reloads(
    split: Twistd, workers: list[Worker], local: dict[str, str]
) -> None:
    victim = workers[1]
    lines = stream_raw(split.url, "Tell me a long story about the sea.", victim)
    # The stream ends with the dialect's error frame, then [DONE]: never a
    # stream that merely stops and looks complete.
    assert lines[-1] == "[DONE]"
    error = json.loads(lines[-2])["error"]
    assert error["code"] == "backend_lost"
    assert f"RPC worker {victim.endpoint}" in error["message"]
    # While the model is out: 503 with why, for /health and for requests.
    health = httpx.get(split.url + "/health")
    assert health.status_code == 503
    model = health.json()["models"][0]
    assert model["losses"] == 1 and str(victim.endpoint) in model["lost"]
    refused = httpx.post(
        split.url + "/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert str(victim.endpoint) in refused.json()["error"]["message"]
    # The server itself never went down.
    assert split.proc.poll() is None
    # The worker comes back on its port; the back-off reload finds it.
    victim.start()
    wait_healthy(split)
    for question, want in local.items():
        assert greedy(split, question) == want
    assert "reloaded after its loss" in split.log_text()


def test_a_worker_that_dies_between_requests_turns_health_503(
    split: Twistd, workers: list[Worker], local: dict[str, str]
) -> None:
    """
    No request runs to find it: the idle probe does (a refusal is the
    one sure sign: a healthy worker serving this server answers no one
    else), so load balancers stop sending before a client pays for it.
    """
    split.wait_idle()
    assert httpx.get(split.url + "/health").status_code == 200
    victim = workers[0]
    victim.kill()
    t = time.monotonic()
    while (health := httpx.get(split.url + "/health")).status_code == 200:
        assert time.monotonic() - t < PROBE_S + 5, "no probe saw the worker go"
        time.sleep(0.1)
    model = health.json()["models"][0]
    assert f"RPC worker {victim.endpoint}: connection refused (the worker is gone)" in model["lost"]
    assert "lost while idle" in split.log_text()
    victim.start()
    wait_healthy(split)
    assert greedy(split, QUESTIONS[1]) == local[QUESTIONS[1]]


def test_a_hung_worker_is_cut_off_at_the_step_timeout(
    split: Twistd, workers: list[Worker], local: dict[str, str]
) -> None:
    """
    A worker that stops answering without closing its connection (its
    host alive, its process stuck: here SIGSTOP) would hang ggml for
    ever; the step timeout ends the model's process instead.
    """
    victim = workers[0]
    assert victim.proc is not None
    t = time.monotonic()
    try:
        lines = stream_raw(split.url, "A long story about a forest.", victim, signal.SIGSTOP)
        waited = time.monotonic() - t
        error = json.loads(lines[-2])["error"]
        assert error["code"] == "backend_lost"
        assert f"no answer to a step in {STEP_TIMEOUT} s" in error["message"]
        # The worker is not down, it just does not answer: the check says so.
        assert f"RPC worker {victim.endpoint}" in error["message"]
        assert STEP_TIMEOUT <= waited < STEP_TIMEOUT + 15, waited
        assert httpx.get(split.url + "/health").status_code == 503
    finally:
        victim.proc.send_signal(signal.SIGCONT)
    # Awake again, it drops the dead connection and takes the reload's.
    wait_healthy(split)
    assert greedy(split, QUESTIONS[0]) == local[QUESTIONS[0]]


def test_a_worker_down_at_start_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "twistd.log"
    cmd = [
        str(BIN / "twistd"), "--nodaemon", "--pidfile=", f"--logfile={log}", "ds4tw",
        "--listen", f"tcp:{free_port()}:interface=127.0.0.1", "--rpc", f"127.0.0.1:{port}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, timeout=120, text=True)
    assert done.returncode != 0
    said = done.stderr + done.stdout
    assert f"--rpc: RPC worker 127.0.0.1:{port}: connection refused" in said, said[-3000:]
    assert "Traceback" not in said
