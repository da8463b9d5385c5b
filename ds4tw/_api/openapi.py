"""
C{GET /openapi.json}: an OpenAPI 3.1 document for every route, with the
request bodies generated from the dialects' pydantic models (so the
document cannot drift from what is validated), both auth schemes, and the
error responses in each dialect's shape.

Success bodies are described, not modelled: they are the wire shapes of
each dialect's C{render.py}, which follow the OpenAI and Anthropic APIs.

Covered by tests/unit/test_openapi.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .._version import __version__
from .dialect import Dialect, Endpoint, Operation
from .sse import Framing

_REF = "#/components/schemas/{model}"

_ERRORS = {
    "400": "The request is malformed or invalid (the message names the field).",
    "401": "The API key is missing or wrong (only when the server has one).",
    "404": "No such route, or no such model.",
    "405": "The route exists but not with this method (see the Allow header).",
    "413": "The request body is larger than the server accepts.",
    "500": "A bug in the server; the message carries the request id of the log line.",
    "503": "The model is loading, the queue is full, or the server is shutting down "
    "(see Retry-After).",
}


def _body(e: Endpoint[Any] | Operation) -> type[BaseModel]:
    body = e.request if isinstance(e, Endpoint) else e.body
    assert body is not None
    return body


def _errors(schema: str, statuses: list[str]) -> dict[str, Any]:
    ref = {"$ref": _REF.format(model=schema)}
    return {
        s: {"description": _ERRORS[s], "content": {"application/json": {"schema": ref}}}
        for s in statuses
    }


def described(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON response described by C{description} (its body, when not modelled: an object)."""
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


#: The opt-in for numbered stage comments on a stream (ds4tw/_api/sse.py, docs/ui.md).
_PROGRESS = {
    "name": "X-DS4TW-Progress",
    "in": "header",
    "required": False,
    "description": "1: a streamed response also carries its stage as an SSE comment at once and "
    "on every change, with numbers (': queued 2', ': prefill 1024/3641', ': decode'); other "
    "streams get the bare stage name only as a keepalive.",
    "schema": {"type": "string", "enum": ["1"]},
}


def openapi_document(
    dialects: Sequence[Dialect], api_key: bool, ui: bool = False
) -> dict[str, Any]:
    """
    The OpenAPI 3.1 document of C{dialects}' routes and the server's own.
    With C{api_key}, the C{/v1} operations require one of the two declared
    security schemes (both are always declared); C{/health}, C{/metrics},
    this document and (with C{ui}) the chat page stay open.
    """
    posts: list[tuple[Dialect, Endpoint[Any] | Operation]] = [
        (d, e) for d in dialects for e in d.endpoints
    ]
    posts += [(d, op) for d in dialects for op in d.operations if op.body is not None]
    models: list[tuple[type[BaseModel], Literal["validation"]]] = [
        (_body(e), "validation") for _, e in posts
    ]
    names, defs = models_json_schema(models, ref_template=_REF)
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    for d in dialects:
        schemas[d.error_name] = dict(d.error_schema)
    security: list[dict[str, list[str]]] = (
        [{"bearerAuth": []}, {"apiKeyHeader": []}] if api_key else []
    )
    auth_errors = ["401"] if api_key else []

    paths: dict[str, Any] = {}
    for d, e in posts:
        # A turn streams, and takes the progress header; an operation says.
        if isinstance(e, Endpoint):
            operation_id, parameters = e.name, [_PROGRESS] if d.framing.comments else []
        else:
            operation_id, parameters = e.operation_id, list(e.parameters)
        paths[e.path] = {
            "post": {
                "summary": e.summary,
                "operationId": operation_id,
                "security": security,
                "parameters": parameters,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": names[(_body(e), "validation")]}},
                },
                "responses": {
                    "200": _streamed(d.framing),
                    **_errors(d.error_name, ["400", *auth_errors, "405", "413", "500", "503"]),
                },
            }
        }
    for d in dialects:
        for op in d.operations:
            if op.body is not None:
                continue
            paths[op.path] = {
                op.method: {
                    "summary": op.summary,
                    "operationId": op.operation_id,
                    "security": security,
                    **({"parameters": list(op.parameters)} if op.parameters else {}),
                    "responses": {
                        **op.responses,
                        **_errors(d.error_name, list(op.errors)),
                        **_errors(d.error_name, [*auth_errors, "405", "500"]),
                    },
                }
            }
    paths["/health"] = {
        "get": {
            "summary": "Readiness",
            "operationId": "health",
            "responses": {
                "200": described("Ready.", _HEALTH),
                "503": described(
                    "Loading, failed to load, or draining (see Retry-After).", _HEALTH
                ),
            },
        }
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "responses": {
                "200": {
                    "description": "Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": described("OpenAPI 3.1.")},
        }
    }
    if ui:
        paths.update(_page_paths())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ds4tw",
            "version": __version__,
            "description": "A local GGUF model over the OpenAI (chat completions, completions, "
            "responses) and Anthropic (messages) APIs. Every response carries an X-Request-Id, "
            "and echoes as X-Session-Id the client's per-conversation key for a balancer's "
            "session affinity: the first of the request headers X-Session-Id, "
            "X-Claude-Code-Session-Id, session-id and x-session-affinity it sent.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


def _streamed(framing: Framing) -> dict[str, Any]:
    """A turn's answer: one JSON body, or a stream in the dialect's framing."""
    kind = framing.headers[b"content-type"].decode().split(";")[0]
    how = (
        "server-sent events (kept alive with comment frames while the model is busy)"
        if framing.comments
        else "newline-delimited JSON (kept alive with empty chunks while the model is busy)"
    )
    return {
        "description": f"The result; with stream set to true, {how}.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            kind: {"schema": {"type": "string"}},
        },
    }


def _page_paths() -> dict[str, Any]:
    def page(description: str) -> dict[str, Any]:
        return {
            "description": description,
            "content": {"text/html": {"schema": {"type": "string"}}},
        }

    return {
        "/": {
            "get": {
                "summary": "The chat page (off with --no-ui; docs/ui.md)",
                "operationId": "ui",
                "responses": {"200": page("The page."), "304": {"description": "Not modified."}},
            }
        },
        "/ui/{name}": {
            "get": {
                "summary": "The chat page's scripts, styles and icon",
                "operationId": "ui_file",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "The file, with its own content type."},
                    "304": {"description": "Not modified."},
                    "404": {"description": "No such file."},
                },
            }
        },
    }


_HEALTH = {
    "type": "object",
    "required": ["status", "model", "queue_depth", "busy", "slots", "slots_busy"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "loading", "error", "draining"]},
        "model": {"type": "string"},
        "queue_depth": {"type": "integer"},
        "busy": {"type": "boolean"},
        "slots": {"type": "integer", "description": "Requests decoded at once (--parallel)."},
        "slots_busy": {"type": "integer", "description": "Slots running a request now."},
    },
}
