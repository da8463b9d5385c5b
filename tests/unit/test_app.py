"""Health, metrics, auth, CORS and body limits: what every route shares."""

from __future__ import annotations

from .conftest import make_rig


def test_health_reports_ready_model_and_queue() -> None:
    rig = make_rig()
    body = rig.http.get("/health").json()
    assert body == {"status": "ok", "model": "scripted", "queue_depth": 0, "busy": False}


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


def test_no_cors_headers_by_default() -> None:
    rig = make_rig()
    ex = rig.http.get("/v1/models", headers={"Origin": "https://app.example"})
    assert ex.header("access-control-allow-origin") is None


def test_body_size_limit() -> None:
    rig = make_rig(max_body_bytes=100)
    ex = rig.chat("x" * 200)
    assert ex.status == 413
    assert "larger than 100 bytes" in ex.json()["error"]["message"]
