"""
The OpenAI routes: C{/v1/models}, C{/v1/chat/completions},
C{/v1/completions}. Each handler is: parse and validate (schema.py),
build the prompt and job (L{ds4tw._turn}), then stream or collect with
the renderer (render.py). Errors become OpenAI-shaped bodies here.

Covered by tests/unit/test_openai_routes.py and
tests/integration/test_openai_sdk.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from twisted.web.server import Request

from .. import _turn
from .._errors import APIError, from_validation
from .._worker import JobCancelled
from . import render
from .schema import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from .._app import Server

Handler = Callable[..., Awaitable[bytes | None]]


def error_response(request: Request, error: APIError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    for k, v in error.headers.items():
        request.setHeader(k.encode(), v.encode())
    return json.dumps(render.error_body(error)).encode()


def add_routes(server: Server) -> None:
    app = server.app
    created = int(time.time())

    def api(handler: Handler) -> Handler:
        """Auth, CORS and OpenAI-shaped errors around a handler."""

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

    @app.route("/v1/models", methods=["GET"])
    @api
    async def models(request: Request) -> bytes:
        card = render.model_card(server.engine.model_id, created, server.engine.n_ctx)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"object": "list", "data": [card]}).encode()

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    @api
    async def model(request: Request, model_id: str) -> bytes:
        if model_id != server.engine.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist", code="model_not_found")
        card = render.model_card(model_id, created, server.engine.n_ctx)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(card).encode()

    @app.route("/v1/chat/completions", methods=["POST"])
    @api
    async def chat_completions(request: Request) -> bytes | None:
        req: ChatCompletionRequest = parse(request, ChatCompletionRequest)
        prompt = await _turn.chat_prompt(server, req.template_messages(), **req.template_kwargs())
        max_tokens = _turn.max_tokens_for(server, prompt, req.requested_max_tokens())
        rid = server.request_id("chatcmpl")
        job = _turn.new_job(
            server,
            prompt,
            req.sampling(max_tokens, prompt.stops),
            f"{rid} chat stream={req.stream}",
        )
        model_name = req.model or server.engine.model_id
        if req.stream:
            renderer = render.ChatStream(rid, model_name, req.include_usage(), req.thinking())
            await _turn.stream(server, request, job, renderer)
            return None
        got = await _turn.collect(server, job)
        reasoning = got.reasoning if req.thinking() else None
        body = render.chat_completion(rid, model_name, got.content, reasoning, got.finish)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    @app.route("/v1/completions", methods=["POST"])
    @api
    async def completions(request: Request) -> bytes | None:
        req: CompletionRequest = parse(request, CompletionRequest)
        prompt = await _turn.text_prompt(server, req.prompt_text_or_tokens())
        max_tokens = _turn.max_tokens_for(server, prompt, req.requested_max_tokens() or 16)
        rid = server.request_id("cmpl")
        label = f"{rid} completion stream={req.stream}"
        job = _turn.new_job(server, prompt, req.sampling(max_tokens), label, reasoning=False)
        model_name = req.model or server.engine.model_id
        if req.stream:
            renderer = render.CompletionStream(rid, model_name, req.include_usage())
            await _turn.stream(server, request, job, renderer)
            return None
        got = await _turn.collect(server, job)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(render.completion(rid, model_name, got.content, got.finish)).encode()
