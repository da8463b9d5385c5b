"""
The OpenAI Responses route, C{POST /v1/responses}: parse and validate
(schema.py), build the prompt and job (L{ds4tw._turn}), then stream or
collect with the builder (render.py). Errors are OpenAI-shaped, by the
chat dialect's own helpers.

Covered by tests/unit/test_responses.py and
tests/integration/test_responses_sdk.py.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

from twisted.web.server import Request

from .. import _turn
from .._errors import APIError
from .._openai.routes import error_response
from .._worker import JobCancelled
from . import render
from .schema import ResponsesRequest

if TYPE_CHECKING:
    from .._app import Server


def add_routes(server: Server) -> None:
    app = server.app

    @app.route("/v1/responses", methods=["POST"])
    async def responses(request: Request) -> bytes | None:
        server.cors(request)
        try:
            server.authorize(request)
            return await _respond(server, request)
        except APIError as e:
            return error_response(request, e)
        except JobCancelled:
            return None  # the client is gone; nothing to say


async def _respond(server: Server, request: Request) -> bytes | None:
    req = ResponsesRequest.parse(server.read_json(request))
    try:
        prompt = await _turn.chat_prompt(server, req.template_messages(), **req.template_kwargs())
    except APIError as e:
        # The shared lifecycle names chat's field; here it is "input".
        if e.param == "messages":
            e.param = "input"
        raise
    max_tokens = _turn.max_tokens_for(server, prompt, req.max_output_tokens)
    params = req.sampling(max_tokens, prompt.stops)
    rid = f"resp_{uuid.uuid4().hex}"
    job = _turn.new_job(server, prompt, params, f"{rid} responses stream={req.stream}")
    model = req.model or server.engine.model_id
    builder = render.ResponseBuilder(rid, int(time.time()), req.echo(model, params), req.thinking())
    if req.stream:
        await _turn.stream(server, request, job, render.ResponsesStream(builder))
        return None
    got = await _turn.collect(server, job)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(render.response_body(builder, got), ensure_ascii=False).encode()
