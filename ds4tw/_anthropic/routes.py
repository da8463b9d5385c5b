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

import json
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from twisted.web.server import Request

from .. import _turn
from .._errors import APIError, from_validation, invalid
from .._turn import Prompt
from .._worker import JobCancelled
from . import render
from .schema import Conversation, CountTokensRequest, MessagesRequest

if TYPE_CHECKING:
    from .._app import Server

Handler = Callable[..., Awaitable[bytes | None]]

_OTHER_METHODS = ["GET", "PUT", "PATCH", "DELETE"]


def error_response(request: Request, error: APIError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for k, v in error.headers.items():
        request.setHeader(k.encode(), v.encode())
    return json.dumps(render.error_body(error)).encode()


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


async def conversation_prompt(server: Server, conv: Conversation, check: bool = True) -> Prompt:
    """
    Template and tokenize off the reactor, like L{_turn.chat_prompt}, with
    two differences Anthropic needs: a trailing assistant turn's text is
    appended after the generation prompt (the model continues it), and
    C{check=False} counts a prompt even when it would not fit the context
    (count_tokens is how a client learns how much to cut).
    """
    messages, prefill = conv.template_messages()
    kwargs = conv.template_kwargs()
    engine = server.engine

    def rendered() -> Prompt:
        try:
            chat = engine.apply_chat_template(messages, **kwargs)
        except Exception as e:  # jinja's raise_exception and friends
            raise invalid(f"the chat template rejected these messages: {e}", "messages") from e
        text = chat.text + prefill
        return Prompt(engine.tokenize(text, add_bos=False), chat.stop, text)

    prompt: Prompt = await _turn._offload(server, rendered)
    return _turn.checked(server, prompt) if check else prompt


def add_routes(server: Server) -> None:
    app = server.app
    # Anthropic's own keepalive event, when asked for; else SSE comments.
    keepalive_frame = (lambda _stage: render.PING) if server.config.anthropic_ping else None

    def api(handler: Handler) -> Handler:
        """Auth, CORS and Anthropic-shaped errors around a handler."""

        async def wrapped(request: Request, **kwargs: Any) -> bytes | None:
            server.cors(request)
            try:
                server.authorize(request)
                return await handler(request, **kwargs)
            except APIError as e:
                return error_response(request, e)
            except JobCancelled:
                return None  # the client is gone; nothing to say

        wrapped.__name__ = handler.__name__
        return wrapped

    def parse(request: Request, model: type[BaseModel]) -> Any:
        payload = server.read_json(request)
        try:
            return model.model_validate(payload)
        except ValidationError as e:
            raise from_validation(e) from e

    @app.route("/v1/messages", methods=["POST"])
    @api
    async def messages(request: Request) -> bytes | None:
        req: MessagesRequest = parse(request, MessagesRequest)
        prompt = await conversation_prompt(server, req)
        max_tokens = _turn.max_tokens_for(server, prompt, req.max_tokens)
        mid = message_id()
        job = _turn.new_job(
            server,
            prompt,
            req.sampling(max_tokens, prompt.stops),
            f"{mid} messages stream={req.stream}",
        )
        stop = partial(
            render.stop_reason,
            stop_sequences=req.stops(),
            context_capped=max_tokens < req.max_tokens,
        )
        display = req.thinking_display()
        if req.stream:
            renderer = render.MessageStream(mid, req.model, len(prompt.tokens), display, stop)
            await _turn.stream(server, request, job, renderer, keepalive_frame)
            return None
        got = await _turn.collect(server, job)
        body = render.message(
            mid, req.model, got.content, got.reasoning, display, got.finish, stop(got.finish)
        )
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    @app.route("/v1/messages/count_tokens", methods=["POST"])
    @api
    async def count_tokens(request: Request) -> bytes:
        req: CountTokensRequest = parse(request, CountTokensRequest)
        prompt = await conversation_prompt(server, req, check=False)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"input_tokens": len(prompt.tokens)}).encode()

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
