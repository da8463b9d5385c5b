"""
What every dialect's routes share: the wrapper that applies CORS and auth
and turns an L{APIError} into that dialect's error body, request parsing
with pydantic, and JSON responses. A dialect supplies only its error
shape.

Covered through each dialect's route tests (tests/unit/test_openai_routes.py,
test_anthropic.py, test_responses.py) and tests/unit/test_app.py.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from twisted.web.server import Request

from ._errors import APIError, cut_off_by_shutdown, from_validation
from ._host import Host
from ._worker import JobCancelled

Handler = Callable[..., Awaitable[bytes | None]]
ErrorBody = Callable[[APIError], dict[str, Any]]
_M = TypeVar("_M", bound=BaseModel)


def json_response(request: Request, payload: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload, ensure_ascii=False).encode()


def error_response(request: Request, error: APIError, body: ErrorBody) -> bytes:
    for k, v in error.headers.items():
        request.setHeader(k.encode(), v.encode())
    return json_response(request, body(error), error.status)


def api(server: Host, body: ErrorBody) -> Callable[[Handler], Handler]:
    """A decorator for a dialect's handlers: CORS, auth, errors in C{body}'s shape."""

    def decorate(handler: Handler) -> Handler:
        async def wrapped(request: Request, **kwargs: Any) -> bytes | None:
            server.cors(request)
            try:
                server.authorize(request)
                return await handler(request, **kwargs)
            except APIError as e:
                return error_response(request, e, body)
            except JobCancelled as e:
                if e.by_shutdown:
                    # Cut off at the drain timeout: the client is still waiting.
                    return error_response(request, cut_off_by_shutdown(), body)
                return None  # the client is gone; nothing to say

        wrapped.__name__ = handler.__name__
        return wrapped

    return decorate


def parse(server: Host, request: Request, model: type[_M]) -> _M:
    """The body as C{model}, or a 400 naming the first bad field."""
    payload = server.read_json(request)
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise from_validation(e) from e
