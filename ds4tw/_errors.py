"""
API errors, independent of dialect. Each dialect renders an L{APIError}
in its own shape (see C{_openai/render.py} and, later, the Anthropic
renderer); routes raise, never format.

Covered by tests/unit/test_openai_errors.py.
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


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def from_validation(error: ValidationError) -> APIError:
    """The first pydantic error, said plainly, with the field as C{param}."""
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    msg = first["msg"].removeprefix("Value error, ")
    return invalid(f"{loc}: {msg}" if loc else msg, param=loc or None)


def not_ready(message: str) -> APIError:
    return APIError(
        503, message, "server_error", code="model_not_ready", headers={"Retry-After": "5"}
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


def unauthorized() -> APIError:
    return APIError(
        401, "Invalid or missing API key.", "authentication_error", code="invalid_api_key"
    )
