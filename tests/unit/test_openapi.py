"""GET /openapi.json: a valid OpenAPI 3.1 document that matches the routes the server has."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate

from ds4tw._api.anthropic.schema import MessagesRequest
from ds4tw._api.openai.schema import ChatCompletionRequest

from .conftest import make_rig

ROUTES = {
    ("get", "/v1/models"),
    ("get", "/v1/models/{model_id}"),
    ("get", "/health"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/responses"),
    ("post", "/v1/messages"),
    ("post", "/v1/messages/count_tokens"),
    ("post", "/v1/embeddings"),
    ("post", "/api/chat"),
    ("post", "/api/generate"),
    ("get", "/api/version"),
    ("get", "/api/tags"),
    ("get", "/api/ps"),
    ("post", "/api/show"),
    ("post", "/api/embed"),
    ("post", "/api/embeddings"),
    ("post", "/api/pull"),
    ("post", "/api/push"),
    ("post", "/api/create"),
    ("post", "/api/copy"),
    ("delete", "/api/delete"),
    ("get", "/"),
    ("get", "/ui/{name}"),
}


def document(**config: Any) -> dict[str, Any]:
    rig = make_rig(**config)
    ex = rig.http.get("/openapi.json")
    assert ex.status == 200
    assert ex.header("content-type") == "application/json"
    body: dict[str, Any] = ex.json()
    return body


@pytest.mark.parametrize("api_key", [None, "sekrit"])
def test_the_document_is_valid_openapi_3_1(api_key: str | None) -> None:
    doc = document(api_key=api_key)
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_every_route_is_described() -> None:
    doc = document()
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert described == ROUTES


def test_without_the_page_its_routes_are_not_described() -> None:
    doc = document(ui=False)
    assert "/" not in doc["paths"] and "/ui/{name}" not in doc["paths"]
    validate(doc)


def test_the_progress_header_is_declared_where_a_response_can_stream() -> None:
    doc = document()
    for path, ops in doc["paths"].items():
        names = {p["name"] for p in ops.get("post", {}).get("parameters", [])}
        # Ollama's NDJSON streams have no comments to carry progress in.
        streams = (
            "post" in ops
            and path.startswith("/v1/")
            and path not in ("/v1/messages/count_tokens", "/v1/embeddings")
        )
        assert ("X-DS4TW-Progress" in names) is streams, path


def test_a_stream_is_described_in_its_own_framing() -> None:
    paths = document()["paths"]
    ndjson = paths["/api/chat"]["post"]["responses"]["200"]["content"]
    sse = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(ndjson) == {"application/json", "application/x-ndjson"}
    assert set(sse) == {"application/json", "text/event-stream"}


def test_request_bodies_come_from_the_pydantic_models() -> None:
    doc = document()
    schemas = doc["components"]["schemas"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    assert chat["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert set(schemas["ChatCompletionRequest"]["properties"]) == set(
        ChatCompletionRequest.model_json_schema()["properties"]
    )
    assert set(schemas["MessagesRequest"]["required"]) == set(
        MessagesRequest.model_json_schema()["required"]
    )


def test_errors_are_in_each_dialects_shape() -> None:
    doc = document()
    for path, dialect in [
        ("/v1/chat/completions", "OpenAIError"),
        ("/v1/completions", "OpenAIError"),
        ("/v1/responses", "OpenAIError"),
        ("/v1/messages", "AnthropicError"),
        ("/v1/messages/count_tokens", "AnthropicError"),
    ]:
        responses = doc["paths"][path]["post"]["responses"]
        for status in ("400", "405", "413", "500", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{dialect}"}, (path, status)


def test_auth_is_declared_and_required_only_with_a_key() -> None:
    open_doc = document()
    schemes = open_doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    assert open_doc["paths"]["/v1/messages"]["post"]["security"] == []
    keyed = document(api_key="sekrit")
    for method, path in ROUTES:
        op = keyed["paths"][path][method]
        if path.startswith(("/v1/", "/api/")):
            assert op["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
            assert "401" in op["responses"]
        else:
            assert "security" not in op


def test_the_document_is_open_without_the_key() -> None:
    rig = make_rig(api_key="sekrit")
    assert rig.http.get("/openapi.json").status == 200


def test_every_described_route_exists() -> None:
    rig = make_rig()
    for method, path in ROUTES:
        ex = rig.http.request(
            method.upper(),
            path.replace("{model_id}", "scripted").replace("{name}", "app.js"),
            b"{}",
        )
        rig.threads.run_until_idle()
        assert ex.status not in (404, 405), (method, path, ex.raw)


def test_the_description_names_every_session_header() -> None:
    from ds4tw._api.ids import SESSION_HEADERS

    text = document()["info"]["description"].lower()
    assert all(name.decode() in text for name in SESSION_HEADERS)
