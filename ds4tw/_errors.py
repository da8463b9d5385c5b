"""
API errors, independent of dialect. Each dialect renders an L{APIError}
in its own shape (L{ds4tw._api.dialect.Dialect.error_body}); handlers
raise, never format.

Covered by tests/unit/test_app.py, tests/unit/test_fuzz.py and each dialect's
route tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


@dataclass
class ContextExceeded(APIError):
    """
    A prompt that leaves no room in the context. The dialects word it
    differently, and clients match the words: Anthropic clients (Claude
    Code among them) know a full context by Anthropic's C{prompt is too
    long: N tokens > M maximum}; OpenAI clients look at the code.
    """

    prompt_tokens: int = 0
    #: The longest prompt the context takes (one token is left to generate).
    limit: int = 0


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_validation(error: ValidationError) -> APIError:
    """The first pydantic error, said plainly, with the field as C{param}."""
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    msg = first["msg"].removeprefix("Value error, ")
    return invalid(f"{loc}: {msg}" if loc else msg, param=loc or None)


@dataclass
class ModelNotFound(APIError):
    """A request naming a model this server does not run (Ollama words it its own way)."""

    name: str = ""


def model_not_found(name: str) -> APIError:
    """A request naming a model this server does not run (OpenAI's wording and code)."""
    return ModelNotFound(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        "not_found_error",
        "model",
        "model_not_found",
        name=name,
    )


def not_ready(message: str) -> APIError:
    return APIError(
        503, message, "server_error", code="model_not_ready", headers={"Retry-After": "5"}
    )


def backend_lost(message: str) -> APIError:
    """The model went away under a request (an RPC worker lost); it is being reloaded."""
    return APIError(
        503,
        f"{message}; the model is being reloaded, retry shortly",
        "server_error",
        code="backend_lost",
        headers={"Retry-After": "5"},
    )


def busy(message: str) -> APIError:
    return APIError(503, message, "server_error", code="server_busy", headers={"Retry-After": "1"})


def shutting_down(message: str = "the server is shutting down; retry shortly") -> APIError:
    """The server is draining: new requests, and jobs cut off at the drain timeout."""
    return APIError(
        503, message, "server_error", code="server_shutting_down", headers={"Retry-After": "5"}
    )


def cut_off_by_shutdown() -> APIError:
    """For a job still running or queued at the shutdown's drain timeout."""
    return shutting_down("the server shut down before this response was complete; retry")


def internal_error(request_id: str) -> APIError:
    """A bug on our side (the log line names C{request_id})."""
    return APIError(
        500,
        f"internal server error (request id {request_id}); the server log has the details",
        "server_error",
        code="internal_error",
    )


def not_found(path: str) -> APIError:
    return APIError(404, f"{path} is not a route of this server", code="not_found")


def method_not_allowed(method: str, path: str, allowed: list[str]) -> APIError:
    use = ", ".join(allowed)
    return APIError(
        405,
        f"{method} {path}: use {use}",
        code="method_not_allowed",
        headers={"Allow": use},
    )


def unauthorized() -> APIError:
    return APIError(
        401, "Invalid or missing API key.", "authentication_error", code="invalid_api_key"
    )
