"""
The one handler every dialect's turns run through: parse the body into
the dialect's request and read it as a L{Turn}; build the prompt (chat
template, tokens, grammar) off the reactor; make the job; then stream it
through the dialect's L{Builder}, or collect it into one body. What
differs between dialects is data (L{ds4tw._api.dialect}); what a request
lives through is here and in L{ds4tw._api.lifecycle} (admission, keepalive,
cancel).

Covered by tests/unit/test_dialects.py, tests/unit/test_openai_routes.py,
tests/unit/test_anthropic.py and tests/unit/test_responses.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.web.server import Request

from . import lifecycle, routing
from .dialect import Begun, Dialect, Endpoint
from .host import Host
from .ids import job_label, response_id
from .prompt import max_tokens_for, prompt_for
from .routing import json_response


async def run_turn(
    server: Host, request: Request, dialect: Dialect, endpoint: Endpoint[Any]
) -> bytes | None:
    """
    Serve one turn of C{endpoint} on the model it names (L{Host.for_model}):
    a stream (returns None once it ends) or a JSON body.
    """
    started = time.monotonic()
    req = endpoint.read(routing.read_json(request, server.config.max_body_bytes))
    if endpoint.early is not None:
        answer = await endpoint.early(server, req)
        if answer is not None:
            return json_response(request, answer)
    turn = endpoint.turn(req)
    host = await server.for_model(turn.model)
    prompt = await prompt_for(host, turn)
    max_tokens = max_tokens_for(host, prompt, turn.max_tokens, turn.context, turn.param)
    params = turn.sampling(max_tokens, prompt.stops)
    rid = response_id(turn.id_kind)
    job = lifecycle.new_job(
        host,
        prompt,
        params,
        job_label(request, rid, turn.what, turn.stream, host.model_name),
        reasoning=turn.messages is not None,
        tooling=turn.tooling,
    )
    # The name the client asked for, as it asked (an alias stays an alias).
    model = turn.model or host.model_name
    begun = Begun(rid, model, len(prompt.tokens), max_tokens, params, started)
    builder = endpoint.builder(req, begun)
    if turn.stream:
        renderer = builder.stream()
        keepalive = dialect.keepalive_frame(server.config, renderer)
        await lifecycle.stream(host, request, job, renderer, keepalive, dialect.framing)
        return None
    got = await lifecycle.collect(host, job)
    return json_response(request, builder.body(got))


def mount(server: Host, dialect: Dialect) -> None:
    """Add C{dialect}'s routes to the server's app, each wrapped by L{ds4tw._api.routing.api}."""
    api = routing.api(server, dialect.error_body)
    for endpoint in dialect.endpoints:
        handler = api(_handler(server, dialect, endpoint))
        # Klein keys its handlers by endpoint name: one per route, never the
        # function's name (every handler here has the same one).
        server.app.route(
            endpoint.path, methods=["POST"], endpoint=f"{dialect.name}:{endpoint.name}"
        )(handler)
    if dialect.routes is not None:
        dialect.routes(server, api)


def _handler(server: Host, dialect: Dialect, endpoint: Endpoint[Any]) -> Callable[..., Any]:
    async def handle(request: Request) -> bytes | None:
        return await run_turn(server, request, dialect, endpoint)

    handle.__name__ = endpoint.name
    return handle
