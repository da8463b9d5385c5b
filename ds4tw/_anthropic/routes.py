"""
The Anthropic routes: C{POST /v1/messages} and
C{POST /v1/messages/count_tokens}. Each handler is: parse and validate
(schema.py), build the prompt and job (L{ds4tw._turn}), then stream or
collect with the renderer (render.py). Every error on these paths, from
a bad body to a full queue, is Anthropic-shaped here.

C{thinking.budget_tokens} is accepted but not enforced: ending a think
at a budget means closing the block in the model's own context (feeding
the end tag), which the engine interface cannot do yet; the client's
C{max_tokens} still bounds the whole turn.

Covered by tests/unit/test_anthropic.py and
tests/integration/test_anthropic_sdk.py.
"""

from __future__ import annotations

import uuid

from twisted.web.server import Request

from .. import _routing, _turn
from .._errors import APIError
from .._host import Host
from .._ids import request_key, session_key
from .._routing import json_response, parse
from .._tools.spec import ResponseFormat, Tooling
from .._turn import Prompt
from . import render
from .schema import Conversation, CountTokensRequest, MessagesRequest

_OTHER_METHODS = ["GET", "PUT", "PATCH", "DELETE"]


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


async def conversation_prompt(
    server: Host,
    conv: Conversation,
    tooling: Tooling | None,
    response_format: ResponseFormat | None = None,
    check: bool = True,
) -> Prompt:
    """
    The prompt of an Anthropic conversation, with its tools (which count
    towards its size). A trailing assistant turn's text is appended after
    the generation prompt (the model continues it); C{check=False}
    counts a prompt even when it would not fit the context (count_tokens
    is how a client learns how much to cut), and builds no grammar.
    """
    messages, prefill = conv.template_messages()
    return await _turn.chat_prompt(
        server,
        messages,
        conv.reasoning_settings(),
        tooling=tooling,
        response_format=response_format,
        continuation=prefill,
        check=check,
        constrain=check,
    )


def add_routes(server: Host) -> None:
    app = server.app
    # Anthropic's own keepalive event, when asked for; else SSE comments.
    keepalive_frame = (lambda _stage: render.PING) if server.config.anthropic_ping else None
    api = _routing.api(server, render.error_body)

    @app.route("/v1/messages", methods=["POST"])
    @api
    async def messages(request: Request) -> bytes | None:
        req = parse(server, request, MessagesRequest)
        tooling = req.tooling()
        prompt = await conversation_prompt(server, req, tooling, req.structured(tooling))
        max_tokens = _turn.max_tokens_for(server, prompt, req.max_tokens)
        mid = message_id()
        job = _turn.new_job(
            server,
            prompt,
            req.sampling(max_tokens, prompt.stops),
            f"{mid} messages stream={req.stream}",
            tooling=tooling,
            session=session_key(request),
            request_id=request_key(request),
        )
        builder = render.MessageBuilder(
            mid,
            req.model,
            len(prompt.tokens),
            req.thinking_display(),
            stop_sequences=req.stops(),
            context_capped=max_tokens < req.max_tokens,
        )
        if req.stream:
            await _turn.stream(server, request, job, builder.stream(), keepalive_frame)
            return None
        got = await _turn.collect(server, job)
        return json_response(request, builder.body(got))

    @app.route("/v1/messages/count_tokens", methods=["POST"])
    @api
    async def count_tokens(request: Request) -> bytes:
        req = parse(server, request, CountTokensRequest)
        prompt = await conversation_prompt(server, req, req.tooling(), check=False)
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
