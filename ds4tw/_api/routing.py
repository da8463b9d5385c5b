"""
What every dialect's routes share: the wrapper that applies CORS and auth,
gives the request its id (and echoes its session id), and turns an
L{APIError} (or a bug: a 500) into that dialect's error body, each logged
in one line with the request id the client saw; JSON bodies
checked before pydantic sees them, request parsing with pydantic, and JSON
responses. A dialect supplies only its error shape.

Covered through each dialect's route tests (tests/unit/test_openai_routes.py,
test_anthropic.py, test_responses.py), tests/unit/test_app.py (bad bodies,
404/405/500, request ids) and tests/unit/test_fuzz.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from .._errors import APIError, cut_off_by_shutdown, from_validation, internal_error, invalid
from .._runtime.worker import JobCancelled
from .host import Host
from .ids import one_line, request_key, session_key

Handler = Callable[..., Awaitable[bytes | None]]
ErrorBody = Callable[[APIError], dict[str, Any]]
_M = TypeVar("_M", bound=BaseModel)

log = Logger()


def json_response(request: Request, payload: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(payload, ensure_ascii=False).encode()


def error_response(request: Request, error: APIError, body: ErrorBody) -> bytes:
    """
    C{error} in C{body}'s shape, with its headers, and one log line naming
    it (L{log_error}): a refused request leaves more in the server's log
    than its access line.
    """
    log_error(request, error)
    return _render_error(request, error, body)


def _render_error(request: Request, error: APIError, body: ErrorBody) -> bytes:
    for k, v in error.headers.items():
        request.setHeader(k.encode(), v.encode())
    return json_response(request, body(error), error.status)


def log_error(request: Request, error: APIError) -> None:
    """
    One line for an error answered instead of a response: its status, the
    route, the request id the client saw (C{X-Request-Id}), the session key
    when there is one, and the message the client got. No traceback: these
    are the client's mistakes or the server's state (busy, loading,
    draining), not bugs; a 5xx is a warning, a 4xx information.
    """
    session = session_key(request)
    emit = log.warn if error.status >= 500 else log.info
    emit(
        "ds4tw: {status} for {method} {path} request={rid}{session}: {message}",
        status=error.status,
        method=one_line(request.method.decode("latin-1"), 20),
        path=one_line(request.path.decode("latin-1"), 200),
        rid=request_key(request),
        session=f" session={session}" if session is not None else "",
        message=one_line(error.message),
    )


def unexpected(request: Request, failure: Any, body: ErrorBody) -> bytes | Deferred[None]:
    """
    A bug, not bad input: log it with the request id and answer a 500 in
    C{body}'s shape. If the response has begun (a stream), no status can be
    sent any more: abort the connection (a clean close would end a chunked
    stream as if it were complete) and return a Deferred that fires once
    it is gone, so that nothing finishes the request before then.
    """
    rid = request_key(request)
    log.failure(
        "{rid} {method} {path}: unhandled error",
        failure,
        rid=rid,
        method=request.method.decode("latin-1"),
        path=request.path.decode("latin-1"),
    )
    if not request.startedWriting:
        return _render_error(request, internal_error(rid), body)  # logged above, in full
    gone: Deferred[None] = request.notifyFinish()
    gone.addErrback(lambda _: None)
    transport = getattr(request.channel, "transport", None)
    if transport is not None:
        transport.abortConnection()
    return gone


def api(server: Host, body: ErrorBody) -> Callable[[Handler], Handler]:
    """A decorator for a dialect's handlers: CORS, auth, errors in C{body}'s shape."""

    def decorate(handler: Handler) -> Handler:
        async def wrapped(request: Request, **kwargs: Any) -> bytes | None:
            request_key(request)
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
            except CancelledError:
                # Klein cancelled the route: the client left before a job
                # was queued (while the prompt was built) or while one ran
                # without streaming (the job's own log line says so).
                log.info(
                    "{method} {path} cancelled: client disconnected",
                    method=request.method.decode("latin-1"),
                    path=request.path.decode("latin-1"),
                )
                return None
            except Exception:
                answer = unexpected(request, Failure(), body)
                if isinstance(answer, Deferred):
                    await answer
                    return None
                return answer

        wrapped.__name__ = handler.__name__
        return wrapped

    return decorate


# -- JSON bodies ----------------------------------------------------------

MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 100
_SURROGATE = re.compile("[\ud800-\udfff]")


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS + 1:
        raise ValueError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _parse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def _check_tree(payload: Any) -> None:
    """No lone surrogates in any string, no deeper than L{MAX_JSON_DEPTH} (iteratively)."""
    stack: list[tuple[Any, int]] = [(payload, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise invalid("the request body has a string with an unpaired surrogate")
        elif isinstance(value, dict | list):
            if depth >= MAX_JSON_DEPTH:
                raise invalid(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))


def load_json_object(body: bytes) -> dict[str, Any]:
    """
    C{body} as a JSON object, or a 400 that says why not: not JSON (or not
    UTF-8), not an object, NaN or infinite numbers, integers of more than
    L{MAX_INT_DIGITS} digits, lone surrogates, nesting deeper than
    L{MAX_JSON_DEPTH}. What passes is safe for every later stage to walk,
    encode and re-serialize.
    """
    if not body.strip():
        raise invalid("the request body is empty; expected a JSON object")
    try:
        payload = json.loads(
            body,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except RecursionError as e:
        raise invalid(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from e
    except ValueError as e:  # includes UnicodeDecodeError and JSONDecodeError
        raise invalid(f"the request body is not valid JSON: {e}") from e
    if not isinstance(payload, dict):
        raise invalid("the request body must be a JSON object")
    _check_tree(payload)
    return payload


def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 that says why not."""
    content = request.content
    body = content.read(limit + 1) if content is not None else b""
    if len(body) > limit:
        raise APIError(413, f"request body larger than {limit} bytes")
    return load_json_object(body)


def validated(model: type[_M], payload: dict[str, Any]) -> _M:
    """C{payload} as C{model}, or a 400 naming the first bad field."""
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise from_validation(e) from e


def parse(request: Request, model: type[_M], limit: int) -> _M:
    """The body as C{model}, or a 400/413 that says why not."""
    return validated(model, read_json(request, limit))
