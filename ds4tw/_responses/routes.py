"""
The OpenAI Responses route, C{POST /v1/responses}: parse and validate
(schema.py), build the prompt and job (L{ds4tw._turn}), then stream or
collect with the builder (render.py). Errors are OpenAI-shaped, by the
chat dialect's own helpers.

Covered by tests/unit/test_responses.py and
tests/integration/test_responses_sdk.py.
"""

from __future__ import annotations

import time
import uuid

from twisted.web.server import Request

from .. import _routing, _turn
from .._host import Host
from .._ids import request_key, session_key
from .._openai.render import error_body
from .._routing import json_response
from . import render
from .schema import ResponsesRequest


def add_routes(server: Host) -> None:
    api = _routing.api(server, error_body)

    @server.app.route("/v1/responses", methods=["POST"])
    @api
    async def responses(request: Request) -> bytes | None:
        return await _respond(server, request)


async def _respond(server: Host, request: Request) -> bytes | None:
    req = ResponsesRequest.parse(server.read_json(request))
    tooling = req.tooling()
    prompt = await _turn.chat_prompt(
        server,
        req.template_messages(),
        req.reasoning_settings(),
        tooling=tooling,
        response_format=req.structured(),
        param="input",
    )
    max_tokens = _turn.max_tokens_for(server, prompt, req.max_output_tokens)
    params = req.sampling(max_tokens, prompt.stops)
    rid = f"resp_{uuid.uuid4().hex}"
    label = f"{rid} responses stream={req.stream}"
    job = _turn.new_job(
        server,
        prompt,
        params,
        label,
        tooling=tooling,
        session=session_key(request),
        request_id=request_key(request),
    )
    model = req.model or server.engine.model_id
    builder = render.ResponseBuilder(
        rid,
        int(time.time()),
        req.echo(model, params),
        req.thinking(),
        tool_kinds=req.tool_kinds(),
        logprobs=req.logprobs_wanted(),
        namespaces=req.tool_namespaces(),
    )
    if req.stream:
        await _turn.stream(server, request, job, render.ResponsesStream(builder))
        return None
    got = await _turn.collect(server, job)
    return json_response(request, render.response_body(builder, got))
