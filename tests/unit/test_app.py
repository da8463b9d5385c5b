"""Health, metrics, auth, CORS and body limits: what every route shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from ds4tw._api import routing

from .conftest import make_rig


def test_health_reports_ready_model_and_queue() -> None:
    rig = make_rig()
    body = rig.http.get("/health").json()
    models = body.pop("models")
    assert body == {
        "status": "ok",
        "model": "scripted",
        "queue_depth": 0,
        "busy": False,
        "slots": 1,
        "slots_busy": 0,
        # What auto read from the (ChatML) template.
        "parsers": {"tool_call": "hermes", "reasoning": "think"},
        # No budget: a single model loaded at start.
        "memory": {"budget_bytes": None, "used_bytes": 0},
    }
    [model] = models
    assert model["name"] == "scripted"
    assert model["state"] == "ready"
    assert model["loads"] == 1
    assert (model["queue_depth"], model["slots"], model["slots_busy"]) == (0, 1, 0)
    assert model["parsers"] == {"tool_call": "hermes", "reasoning": "think"}


def test_health_and_the_log_name_the_parsers_auto_read_from_the_template() -> None:
    logged: list[str] = []

    def observe(event: Any) -> None:
        logged.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        source = Path(__file__).parent.parent / "data" / "templates" / "openai-gpt-oss-120b.jinja"
        rig = make_rig(chat_template=source.read_text(encoding="utf-8"))
    finally:
        globalLogPublisher.removeObserver(observe)
    parsers = rig.http.get("/health").json()["parsers"]
    assert parsers == {"tool_call": "gpt_oss", "reasoning": "gpt_oss"}
    assert (
        "scripted: parsers: tool calls gpt_oss, reasoning gpt_oss (configured: auto, auto)"
        in logged
    )


def test_metrics_count_jobs_and_tokens() -> None:
    rig = make_rig(["a b c"])
    rig.chat()
    rig.threads.run_until_idle()
    ex = rig.http.get("/metrics")
    assert ex.header("content-type").startswith("text/plain")
    text = ex.body.decode()
    assert 'ds4tw_jobs_total{outcome="done"} 1.0' in text
    assert "ds4tw_completion_tokens_total 3.0" in text
    assert "ds4tw_model_ready 1.0" in text
    assert "ds4tw_queue_depth 0.0" in text


def test_api_key_is_required_when_configured() -> None:
    rig = make_rig(api_key="sekrit")
    denied = rig.chat()
    assert denied.status == 401
    assert denied.json()["error"]["type"] == "authentication_error"
    assert rig.engine.calls == []
    bearer = rig.http.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": "Bearer sekrit"},
    )
    header = rig.http.get("/v1/models", headers={"x-api-key": "sekrit"})
    rig.threads.run_until_idle()
    assert bearer.status == 200 and header.status == 200
    assert rig.http.get("/v1/models", headers={"Authorization": "Bearer nope"}).status == 401
    # Health and metrics stay open for probes and scrapers.
    assert rig.http.get("/health").status == 200


def test_cors() -> None:
    rig = make_rig(cors_origins=("https://app.example",))
    ex = rig.http.get("/v1/models", headers={"Origin": "https://app.example"})
    assert ex.header("access-control-allow-origin") == "https://app.example"
    other = rig.http.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert other.header("access-control-allow-origin") is None
    pre = rig.http.request(
        "OPTIONS", "/v1/chat/completions", headers={"Origin": "https://app.example"}
    )
    assert pre.status == 204
    assert "authorization" in (pre.header("access-control-allow-headers") or "")
    # What a page's script may read, only for the allowed origin.
    assert ex.header("access-control-expose-headers") == "x-request-id, x-session-id, retry-after"
    assert other.header("access-control-expose-headers") is None


def test_a_preflight_allows_the_headers_it_asks_for() -> None:
    """The JS SDKs send headers of their own: a fixed list failed their preflight."""
    rig = make_rig(cors_origins=("https://app.example",))
    asked = (
        "authorization, content-type, x-stainless-os, x-stainless-retry-count, "
        "anthropic-dangerous-direct-browser-access,x-ds4tw-progress"
    )
    pre = rig.http.request(
        "OPTIONS",
        "/v1/messages",
        headers={"Origin": "https://app.example", "Access-Control-Request-Headers": asked},
    )
    assert pre.status == 204
    assert pre.header("access-control-allow-origin") == "https://app.example"
    assert pre.header("access-control-allow-headers") == asked
    assert pre.header("vary") == "Origin, Access-Control-Request-Headers"


@pytest.mark.parametrize("asked", ["x-a; x-b", "x-a,,x-b", "x-a, ", "x(a)", "x-a\tx-b"])
def test_a_preflight_asking_for_no_header_names_gets_the_fixed_list(asked: str) -> None:
    rig = make_rig(cors_origins=("*",))
    pre = rig.http.request(
        "OPTIONS",
        "/v1/chat/completions",
        headers={"Origin": "https://any.example", "Access-Control-Request-Headers": asked},
    )
    allowed = pre.header("access-control-allow-headers") or ""
    assert asked not in allowed
    assert {"authorization", "x-api-key", "x-ds4tw-progress"} <= set(allowed.split(", "))


def test_no_cors_headers_by_default() -> None:
    rig = make_rig()
    ex = rig.http.get("/v1/models", headers={"Origin": "https://app.example"})
    assert ex.header("access-control-allow-origin") is None


def test_body_size_limit() -> None:
    rig = make_rig(max_body_bytes=100)
    ex = rig.chat("x" * 200)
    assert ex.status == 413
    assert "larger than 100 bytes" in ex.json()["error"]["message"]


# -- no HTML, no 500 for bad input; request ids ------------------------------

OPENAI_POSTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
ANTHROPIC_POSTS = ("/v1/messages", "/v1/messages/count_tokens")


def assert_openai_error(ex: Any, status: int) -> dict[str, Any]:
    assert ex.status == status, ex.raw
    assert ex.header("content-type") == "application/json"
    err = ex.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def assert_anthropic_error(ex: Any, status: int) -> dict[str, Any]:
    assert ex.status == status, ex.raw
    assert ex.header("content-type") == "application/json"
    body = ex.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]


BAD_BODIES = [
    b"{",
    b"\xff\xfe\x00",
    b'{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "x", "prompt": "\\udc00x", "input": "\\udfff"}',
    b"[" * 50_000 + b"]" * 50_000,
    b'{"a":' * 70 + b"1" + b"}" * 70,
    b'{"max_tokens": ' + b"9" * 5000 + b"}",
    b'{"temperature": 1e999, "max_tokens": 5}',
    b'{"temperature": NaN}',
    b'{"temperature": -Infinity}',
    b"[]",
    b'"text"',
    b"null",
    b"",
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_malformed_bodies_get_a_400_in_the_dialect_shape(body: bytes) -> None:
    rig = make_rig()
    for path in OPENAI_POSTS:
        err = assert_openai_error(rig.http.request("POST", path, body), 400)
        assert err["type"] == "invalid_request_error"
    for path in ANTHROPIC_POSTS:
        err = assert_anthropic_error(rig.http.request("POST", path, body), 400)
        assert err["type"] == "invalid_request_error"
    assert rig.engine.calls == []
    ok = rig.chat()
    rig.threads.run_until_idle()
    assert ok.status == 200


def test_any_content_type_is_read_as_json() -> None:
    """curl -d sends form-urlencoded; the body is what counts."""
    rig = make_rig()
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}]})
    ok = rig.http.request(
        "POST", "/v1/chat/completions", body.encode(), {"Content-Type": "text/plain"}
    )
    bad = rig.http.request(
        "POST", "/v1/messages", b"a=1&b=2", {"Content-Type": "application/x-www-form-urlencoded"}
    )
    rig.threads.run_until_idle()
    assert ok.status == 200
    assert_anthropic_error(bad, 400)


def test_unknown_paths_and_wrong_methods_are_json() -> None:
    rig = make_rig()
    err = assert_openai_error(rig.http.get("/v1/nope"), 404)
    assert err["code"] == "not_found"
    assert_openai_error(rig.http.request("POST", "/v1/chat/nope", b"{}"), 404)
    assert_openai_error(rig.http.get("/nope"), 404)
    wrong = rig.http.get("/v1/chat/completions")
    assert assert_openai_error(wrong, 405)["code"] == "method_not_allowed"
    assert wrong.header("allow") == "POST"
    assert rig.http.request("POST", "/v1/models", b"{}").header("allow") == "GET"
    assert_openai_error(rig.http.request("DELETE", "/v1/responses"), 405)
    assert_openai_error(rig.http.request("POST", "/health"), 405)
    # Anthropic's paths answer in Anthropic's shape.
    assert assert_anthropic_error(rig.http.get("/v1/messages"), 405)["type"] == (
        "invalid_request_error"
    )
    assert_anthropic_error(rig.http.get("/v1/messages/count_tokens"), 405)
    assert assert_anthropic_error(rig.http.get("/v1/messages/batches"), 404)["type"] == (
        "not_found_error"
    )


def test_every_response_has_a_request_id() -> None:
    rig = make_rig()
    ids = {
        rig.http.get("/health").header("x-request-id"),
        rig.http.get("/v1/nope").header("x-request-id"),
        rig.http.request("POST", "/v1/messages", b"{").header("x-request-id"),
        rig.http.get("/v1/models").header("x-request-id"),
    }
    assert None not in ids and len(ids) == 4
    mine = rig.http.get("/v1/models", headers={"X-Request-Id": "client-42.a:b"})
    assert mine.header("x-request-id") == "client-42.a:b"
    for insane in ("has space", "x" * 129, "<script>"):
        other = rig.http.get("/v1/models", headers={"X-Request-Id": insane})
        assert (other.header("x-request-id") or "").startswith("req_")


@pytest.mark.logs_unhandled_errors
def test_an_unhandled_error_is_a_500_in_the_dialect_shape_and_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = make_rig()
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:

        def boom(request: Any, limit: int) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(routing, "read_json", boom)
        for path in OPENAI_POSTS:
            ex = rig.http.post(path, {}, headers={"X-Request-Id": "bug-1"})
            err = assert_openai_error(ex, 500)
            assert err["type"] == "server_error" and "bug-1" in err["message"]
            assert "a bug" not in err["message"]
        for path in ANTHROPIC_POSTS:
            err = assert_anthropic_error(rig.http.post(path, {}), 500)
            assert err["type"] == "api_error"
        # Outside the dialects' handlers too (here, /health).
        monkeypatch.setattr(rig.server.worker.__class__, "busy", property(lambda _: 1 / 0))
        assert_openai_error(rig.http.get("/health"), 500)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    failures = [e for e in logged if e.get("log_failure") is not None]
    assert len(failures) == 6
    assert "bug-1" in formatEvent(failures[0])
    assert b"Processing Failed" not in rig.http.get("/v1/models").raw


@pytest.mark.logs_unhandled_errors
def test_an_unhandled_error_mid_stream_aborts_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the status is sent no 500 can be: the client must not see a clean end."""
    from ds4tw._api import lifecycle

    async def broken_stream(server: Any, request: Any, *args: Any, **kw: Any) -> None:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: {}\n\n")
        raise RuntimeError("a bug mid-stream")

    rig = make_rig()
    monkeypatch.setattr(lifecycle, "stream", broken_stream)
    ex = rig.stream()
    assert ex.status == 200
    assert ex.transport.disconnected  # aborted
    ex.disconnect()
    monkeypatch.undo()
    ok = rig.stream()
    rig.threads.run_until_idle()
    assert ok.finished and ok.data()[-1] == "[DONE]"


def test_a_path_that_is_not_utf8_is_a_json_400() -> None:
    rig = make_rig()
    assert_openai_error(rig.http.get("/v1/models/%ff"), 400)
    assert_openai_error(rig.http.request("POST", "/v1/chat/completions%ff", b"{}"), 400)
    assert_anthropic_error(rig.http.request("POST", "/v1/messages/%c3", b"{}"), 400)


def test_schemas_as_deep_as_the_nesting_limit_allows_still_serve() -> None:
    """The limit is what keeps recursive schema walkers (grammars, checks) inside the stack."""
    rig = make_rig()
    objects: dict[str, Any] = {"type": "string"}
    arrays: dict[str, Any] = {"type": "string"}
    for _ in range(29):
        objects = {"type": "object", "properties": {"a": objects}, "required": ["a"]}
    for _ in range(58):
        arrays = {"type": "array", "items": arrays}
    for schema in (objects, arrays):
        fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
        tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
        done = [rig.chat(response_format=fmt), rig.chat(tools=[tool], tool_choice="required")]
        rig.threads.run_until_idle()
        assert [ex.status for ex in done] == [200, 200], [ex.body for ex in done]


# -- session keys ---------------------------------------------------------------

#: Each agent's own header, and the key ds4tw takes from it.
AGENT_SESSION_HEADERS = {
    "X-Claude-Code-Session-Id": "5d0f7c5e-3b7a-4c1e-9a53-0c3f6f7e8a21",  # Claude Code
    "session-id": "019a7e2c-55d1-7c30-b0a4-7d9e3c1f2b6a",  # Codex
    "x-session-affinity": "ses_7d1e4c2b9a0fXk3LmN8pQr5sTu",  # opencode
}


@pytest.mark.parametrize("header", sorted(AGENT_SESSION_HEADERS))
def test_each_agents_session_header_is_the_session_key(header: str) -> None:
    """Echoed as X-Session-Id and named in the job's log line, like X-Session-Id itself."""
    rig = make_rig()
    key = AGENT_SESSION_HEADERS[header]
    lines: list[str] = []
    observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        payload = {"messages": [{"role": "user", "content": "hi"}]}
        ex = rig.http.post("/v1/chat/completions", payload, {header: key})
        rig.threads.run_until_idle()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert ex.status == 200
    assert ex.header("x-session-id") == key
    # Only under ds4tw's name: the agent's own header is not echoed.
    assert header.lower() == "x-session-id" or ex.header(header) is None
    assert [line for line in lines if " done: " in line and f"session={key} " in line]


def test_session_headers_take_precedence_in_one_order() -> None:
    """X-Session-Id, then Claude Code's, Codex's and opencode's: docs/deploy.md's order."""
    rig = make_rig()
    headers = {
        "X-Session-Id": "mine",
        "X-Claude-Code-Session-Id": "claude",
        "session-id": "codex",
        "x-session-affinity": "opencode",
    }
    expected = ["mine", "claude", "codex", "opencode"]
    for name, want in zip(list(headers), expected, strict=True):
        assert rig.http.get("/health", headers).header("x-session-id") == want
        headers.pop(name)
    assert rig.http.get("/health", headers).header("x-session-id") is None
    # An empty header is absent; an insane one is ignored without falling
    # through (a balancer hashed on it, so the next header is not the key).
    empty = {"X-Session-Id": "", "session-id": "codex"}
    assert rig.http.get("/health", empty).header("x-session-id") == "codex"
    insane = {"X-Claude-Code-Session-Id": "has space", "session-id": "codex"}
    assert rig.http.get("/health", insane).header("x-session-id") is None


# -- every refusal is logged in one line ----------------------------------------


class ErrorLines:
    """The server's one-line error log events, while in the block."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> ErrorLines:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def take(self) -> list[str]:
        lines = [formatEvent(e) for e in self.events if formatEvent(e).startswith("ds4tw: ")]
        assert not [e for e in self.events if e.get("log_failure") is not None]
        self.events.clear()
        return lines


def test_every_error_answered_instead_of_a_response_is_logged_with_its_request_id() -> None:
    """
    Status, route, the X-Request-Id the client saw and the message it got,
    in one line without a traceback, for each way a request is refused.
    """
    rig = make_rig(api_key="k", max_body_bytes=2000, max_queue=0)
    auth = {"Authorization": "Bearer k"}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    busy = rig.http.post("/v1/chat/completions", chat, auth)  # holds the only slot
    cases: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("POST", "/v1/chat/completions", b'{"messages": "x"}', auth),  # 400 from pydantic
        ("POST", "/v1/messages", b'{"max_tokens": 1}', auth),  # 400, Anthropic's shape
        ("POST", "/v1/chat/completions", b"{", {}),  # 401 comes first
        ("GET", "/v1/nope", b"", auth),  # 404
        ("GET", "/v1/chat/completions", b"", auth),  # 405
        ("POST", "/v1/responses", b'{"input": "' + b"x" * 3000 + b'"}', auth),  # 413
        ("POST", "/v1/chat/completions", json.dumps(chat).encode(), auth),  # 503: busy
        ("GET", "/v1/models/%ff", b"", auth),  # 400: the path is not UTF-8
    ]
    statuses = []
    with ErrorLines() as logs:
        for n, (method, path, body, headers) in enumerate(cases):
            rid = f"case-{n}"
            ex = rig.http.request(method, path, body, {**headers, "X-Request-Id": rid})
            statuses.append(ex.status)
            payload = ex.json()
            message = payload["error"]["message"]
            assert ex.header("x-request-id") == rid
            (line,) = logs.take()
            assert line == f"ds4tw: {ex.status} for {method} {path} request={rid}: {message}"
    assert statuses == [400, 400, 401, 404, 405, 413, 503, 400]
    rig.threads.run_until_idle()
    assert busy.status == 200


def test_an_error_log_line_names_the_session_and_stays_one_line() -> None:
    rig = make_rig()
    with ErrorLines() as logs:
        rig.http.get("/v1/a%0d%0aforged%1b[31m", {"X-Session-Id": "conv-1", "X-Request-Id": "r1"})
        (line,) = logs.take()
    assert line.startswith(
        "ds4tw: 404 for GET /v1/a%0d%0aforged%1b[31m request=r1 session=conv-1: "
    )
    # What the client put in the message (here, its path) cannot start a line of its own.
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    with ErrorLines() as logs:
        ok = rig.http.get("/v1/models")
        assert ok.status == 200 and logs.take() == []


def test_a_refusal_by_the_connection_is_logged_with_the_request_id_it_carries() -> None:
    from ds4tw.testing import HTTPHarness

    rig = make_rig()
    http = HTTPHarness(rig.server.resource(), rig.clock, max_body_bytes=100)
    with ErrorLines() as logs:
        ex = http.connect(
            b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: h\r\nX-Request-Id: big-1\r\n"
            b"Content-Length: 5000\r\n\r\n"
        )
        (line,) = logs.take()
    assert ex.status == 413 and ex.header("x-request-id") == "big-1"
    message = ex.json()["error"]["message"]
    assert line.startswith(f"ds4tw: 413 for POST /v1/chat/completions request=big-1: {message} ")


# -- repeated slashes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1//chat/completions"),
        ("POST", "//v1/chat/completions"),
        ("POST", "/v1///chat//completions"),
        ("POST", "/v1//messages"),
        ("GET", "/v1//models"),
        ("GET", "/ui//app.js"),
    ],
)
def test_repeated_slashes_are_served_as_the_path_they_mean(method: str, path: str) -> None:
    """
    What a client that joins a base URL ending in a slash with a path asks
    for. werkzeug answered it with a redirect that escaped Klein as a 500;
    a redirect would lose a POST's body in many clients anyway.
    """
    rig = make_rig(["Bonjour."])
    body = b""
    if method == "POST":
        payload = {
            "model": "m",
            "max_tokens": 7,
            "messages": [{"role": "user", "content": "Say hello."}],
        }
        body = json.dumps(payload).encode()
    ex = rig.http.request(method, path, body)
    rig.threads.run_until_idle()
    assert ex.status == 200, ex.raw
    assert ex.header("location") is None
    if "chat" in path:
        assert ex.json()["choices"][0]["message"]["content"] == "Bonjour."
    elif "messages" in path:
        assert ex.json()["content"][0]["text"] == "Bonjour."
    if method == "POST":  # the body reached the model
        assert rig.engine.calls[-1][1].max_tokens == 7


def test_repeated_slashes_elsewhere_are_a_json_404_never_a_500() -> None:
    rig = make_rig()
    assert_openai_error(rig.http.get("/v1//nope"), 404)
    # A trailing slash is part of the path: /v1/models/ is no route.
    assert_openai_error(rig.http.get("/v1/models//"), 404)
    # Reached without the collapsing resource (the Klein app itself), a
    # double slash is a 404 too, not werkzeug's redirect as a 500.
    from ds4tw.testing import HTTPHarness

    bare = HTTPHarness(rig.server.app.resource(), rig.clock)
    assert_openai_error(bare.get("/v1//models"), 404)
