"""
The OpenAI routes: C{/v1/models}, C{/v1/chat/completions},
C{/v1/completions}. Each handler is: parse and validate (schema.py),
build the prompt and job (L{ds4tw._turn}), then stream or collect with
the renderer (render.py). Errors become OpenAI-shaped bodies here.

Covered by tests/unit/test_openai_routes.py and
tests/integration/test_openai_sdk.py.
"""

from __future__ import annotations

import time

from twisted.web.server import Request

from .. import _routing, _turn
from .._errors import APIError
from .._host import Host
from .._ids import request_key, session_key
from .._routing import json_response, parse
from . import render
from .schema import ChatCompletionRequest, CompletionRequest


def add_routes(server: Host) -> None:
    app = server.app
    created = int(time.time())
    api = _routing.api(server, render.error_body)

    @app.route("/v1/models", methods=["GET"])
    @api
    async def models(request: Request) -> bytes:
        card = render.model_card(server.engine.model_id, created, server.engine.n_ctx)
        return json_response(request, {"object": "list", "data": [card]})

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    @api
    async def model(request: Request, model_id: str) -> bytes:
        if model_id != server.engine.model_id:
            raise APIError(404, f"The model '{model_id}' does not exist", code="model_not_found")
        return json_response(request, render.model_card(model_id, created, server.engine.n_ctx))

    @app.route("/v1/chat/completions", methods=["POST"])
    @api
    async def chat_completions(request: Request) -> bytes | None:
        req = parse(server, request, ChatCompletionRequest)
        tooling = req.tooling()
        prompt = await _turn.chat_prompt(
            server,
            req.template_messages(),
            req.reasoning_settings(),
            tooling=tooling,
            response_format=req.structured(),
        )
        max_tokens = _turn.max_tokens_for(server, prompt, req.requested_max_tokens())
        rid = server.request_id("chatcmpl")
        job = _turn.new_job(
            server,
            prompt,
            req.sampling(max_tokens, prompt.stops),
            f"{rid} chat stream={req.stream}",
            tooling=tooling,
            session=session_key(request),
            request_id=request_key(request),
        )
        model_name = req.model or server.engine.model_id
        builder = render.ChatBuilder(
            rid, model_name, req.include_usage(), req.thinking(), req.logprobs
        )
        if req.stream:
            await _turn.stream(server, request, job, builder.stream())
            return None
        got = await _turn.collect(server, job)
        return json_response(request, builder.body(got))

    @app.route("/v1/completions", methods=["POST"])
    @api
    async def completions(request: Request) -> bytes | None:
        req = parse(server, request, CompletionRequest)
        prompt = await _turn.text_prompt(server, req.prompt_text_or_tokens())
        max_tokens = _turn.max_tokens_for(server, prompt, req.requested_max_tokens() or 16)
        rid = server.request_id("cmpl")
        label = f"{rid} completion stream={req.stream}"
        job = _turn.new_job(
            server,
            prompt,
            req.sampling(max_tokens),
            label,
            reasoning=False,
            session=session_key(request),
            request_id=request_key(request),
        )
        model_name = req.model or server.engine.model_id
        logprobs = req.logprobs is not None
        builder = render.CompletionBuilder(rid, model_name, req.include_usage(), logprobs)
        if req.stream:
            await _turn.stream(server, request, job, builder.stream())
            return None
        got = await _turn.collect(server, job)
        return json_response(request, builder.body(got))
