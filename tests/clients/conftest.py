"""
Real clients of ds4tw's Ollama API, other than the Python libraries
(tests/integration/test_ollama_sdk.py): ollama-js run by node, and the
requests Open WebUI and VS Code Copilot send, against `twistd -n ds4tw`
on the scripted engine.

Not in tests/agents: those are coding agents, run on a prompt through a
shared stage (a 262144-token server, every agent installed); these are an
API's clients, each checked call by call against small servers of their
own. ollama-js is installed with the agents (scripts/install-agents.sh,
outside the checkout); a missing node or npm fails the tests, it never
skips them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents.agents import install
from tests.integration.conftest import Twistd, start_twistd, stop_twistd

#: What the scripted engine answers every request with.
REPLY = "Hello from ds4tw."
#: The context every server here is started with (what /api/show reports).
CTX = 4096
#: Prompt tokens per second (one token per character) on the paced server:
#: a short chat prompt (about 90 tokens with its template, 70 of them not
#: in the prefix cache) prefills for over 1.7 s, so with --keepalive 1 a
#: keepalive chunk certainly comes first.
PREFILL_TPS = 40
KEEPALIVE_S = 1


def serve(tmp: Path, spec: str, *args: str) -> Iterator[Twistd]:
    server = start_twistd(tmp, "--model", spec, "--ctx", str(CTX), *args)
    yield server
    stop_twistd(server)
    assert "Traceback" not in server.log_text(), server.log_text()[-3000:]


@pytest.fixture(scope="session")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    """A server that answers at once."""
    yield from serve(tmp_path_factory.mktemp("fast"), f"scripted:reply={REPLY}")


@pytest.fixture(scope="session")
def paced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    """A server whose prefill takes seconds, with a keepalive every second."""
    spec = f"scripted:prefill_tps={PREFILL_TPS},reply={REPLY}"
    yield from serve(tmp_path_factory.mktemp("paced"), spec, "--keepalive", str(KEEPALIVE_S))


@pytest.fixture(scope="session")
def ollama_js() -> tuple[str, str]:
    """Where the pinned ollama-js is installed, and its version."""
    paths = install()
    return paths["ollama-js"], paths["ollama-js_version"]
