"""
The Anthropic dialect: C{POST /v1/messages} as a turn (schema.py
validates, render.py answers), C{/v1/messages/count_tokens}, and
Anthropic's error shape for every path under C{/v1/messages}, from a bad
body to a full queue or a wrong method.

With C{--anthropic-ping} its streams are kept alive with Anthropic's own
C{event: ping} frame instead of an SSE comment.

Covered by tests/unit/test_anthropic.py, tests/unit/test_dialects.py and
tests/integration/test_anthropic_sdk.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.web.server import Request

from ..._errors import APIError
from ..._types import StreamRenderer
from ..dialect import Api, Begun, Dialect, Endpoint, Operation, Turn
from ..host import Host, ServerConfig
from ..prompt import prompt_for
from ..routing import json_response, parse
from . import render
from .schema import Conversation, CountTokensRequest, MessagesRequest

_OTHER_METHODS = ["GET", "PUT", "PATCH", "DELETE"]

ANTHROPIC_ERROR: dict[str, Any] = {
    "type": "object",
    "description": "An Anthropic-shaped error.",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}


def conversation_turn(
    req: Conversation, stream: bool = False, max_tokens: int | None = None
) -> Turn:
    """
    An Anthropic conversation as a turn, with its tools (which count
    towards its size). A trailing assistant turn's text is the reply's
    beginning (the model continues it).
    """
    # Tools first: a request with several faults is refused for the same
    # one as ever.
    tooling = req.tooling()
    fmt = req.structured(tooling) if isinstance(req, MessagesRequest) else None
    messages, prefill = req.template_messages()
    sampling = req.sampling if isinstance(req, MessagesRequest) else _no_sampling
    return Turn(
        "messages",
        "msg",
        stream,
        req.model,
        sampling,
        messages=messages,
        continuation=prefill,
        reasoning=req.reasoning_settings(),
        tooling=tooling,
        response_format=fmt,
        max_tokens=max_tokens,
    )


def _no_sampling(max_tokens: int, stops: tuple[str, ...]) -> Any:
    raise AssertionError("a token count samples nothing")


def messages_turn(req: MessagesRequest) -> Turn:
    return conversation_turn(req, req.stream, req.max_tokens)


def message_builder(req: MessagesRequest, begun: Begun) -> render.MessageBuilder:
    return render.MessageBuilder(
        begun.id,
        begun.model,
        begun.prompt_tokens,
        req.thinking_display(),
        stop_sequences=req.stops(),
        context_capped=begun.max_tokens < req.max_tokens,
    )


def keepalive_frame(
    config: ServerConfig, _renderer: StreamRenderer
) -> Callable[[str], bytes] | None:
    return (lambda _stage: render.PING) if config.anthropic_ping else None


def routes(server: Host, api: Api) -> None:
    """C{count_tokens}, and Anthropic-shaped answers for the wrong method or path."""
    app = server.app

    @app.route("/v1/messages/count_tokens", methods=["POST"])
    @api
    async def count_tokens(request: Request) -> bytes:
        req = parse(request, CountTokensRequest, server.config.max_body_bytes)
        # Counted even when it would not fit the context: this is how a
        # client learns how much to cut.
        turn = conversation_turn(req)
        prompt = await prompt_for(await server.for_model(turn.model), turn, check=False)
        return json_response(request, {"input_tokens": len(prompt.tokens)})

    @app.route("/v1/messages", methods=_OTHER_METHODS)
    @api
    async def messages_other_method(request: Request) -> bytes:
        request.setHeader(b"allow", b"POST")
        raise APIError(405, f"{request.method.decode()} /v1/messages: use POST")

    @app.route("/v1/messages/<path:rest>", methods=["POST", *_OTHER_METHODS])
    @api
    async def messages_other(request: Request, rest: str) -> bytes:
        if rest == "count_tokens":
            request.setHeader(b"allow", b"POST")
            raise APIError(405, f"{request.method.decode()} /v1/messages/count_tokens: use POST")
        raise APIError(
            404,
            f"/v1/messages/{rest} is not supported by this server "
            "(it serves /v1/messages and /v1/messages/count_tokens)",
        )


DIALECT = Dialect(
    "anthropic",
    render.error_body,
    "AnthropicError",
    ANTHROPIC_ERROR,
    endpoints=(
        Endpoint(
            "/v1/messages",
            MessagesRequest,
            "Anthropic Messages",
            messages_turn,
            message_builder,
        ),
    ),
    routes=routes,
    operations=(
        Operation(
            "/v1/messages/count_tokens",
            "post",
            "v1_messages_count_tokens",
            "Anthropic token count of a Messages request",
            body=CountTokensRequest,
        ),
    ),
    owns=re.compile(r"/v1/messages(/|$)"),
    keepalive_frame=keepalive_frame,
)
