"""
The OpenAI dialect: C{/v1/chat/completions} and C{/v1/completions} as
turns (schema.py validates, render.py answers), the model list, and
OpenAI's error shape, which is also every path's error shape that no other
dialect claims.

Covered by tests/unit/test_openai_routes.py, tests/unit/test_dialects.py
and tests/integration/test_openai_sdk.py.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.web.server import Request

from ..._errors import model_not_found
from ..._runtime.fleet import Model
from ..dialect import Api, Begun, Dialect, Endpoint, Operation, Turn
from ..host import Host
from ..openapi import described
from ..routing import json_response
from . import embeddings, render
from .schema import ChatCompletionRequest, CompletionRequest

#: What a completion writes when the client names no budget: OpenAI's default.
COMPLETION_MAX_TOKENS = 16

OPENAI_ERROR: dict[str, Any] = {
    "type": "object",
    "description": "An OpenAI-shaped error.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def chat_turn(req: ChatCompletionRequest) -> Turn:
    # In this order, so that a request with several faults is refused for
    # the same one as ever: the tools first.
    tooling = req.tooling()
    return Turn(
        "chat",
        "chatcmpl",
        req.stream,
        req.model,
        req.sampling,
        messages=req.template_messages(),
        reasoning=req.reasoning_settings(),
        tooling=tooling,
        response_format=req.structured(),
        max_tokens=req.requested_max_tokens(),
    )


def chat_builder(req: ChatCompletionRequest, begun: Begun) -> render.ChatBuilder:
    return render.ChatBuilder(
        begun.id, begun.model, req.include_usage(), req.thinking(), req.logprobs
    )


def completion_turn(req: CompletionRequest) -> Turn:
    return Turn(
        "completion",
        "cmpl",
        req.stream,
        req.model,
        req.sampling,
        text=req.prompt_text_or_tokens(),
        max_tokens=req.requested_max_tokens() or COMPLETION_MAX_TOKENS,
        param="prompt",
    )


def completion_builder(req: CompletionRequest, begun: Begun) -> render.CompletionBuilder:
    return render.CompletionBuilder(
        begun.id, begun.model, req.include_usage(), req.logprobs is not None
    )


def model_routes(server: Host, api: Api) -> None:
    """
    C{/v1/models}: every model this server runs, and every exact alias,
    with its context size, kind and whether it is loaded now; and
    C{/v1/embeddings} (L{ds4tw._api.openai.embeddings}).
    """
    embeddings.add_routes(server, api, server)
    app = server.app
    created = int(time.time())

    def card(model: Model, as_name: str | None = None) -> dict[str, object]:
        return render.model_card(
            as_name or model.name,
            created,
            model.n_ctx,
            kind=model.kind,
            state=model.runner.state.value,
            aliases=model.aliases,
            alias_of=model.name if as_name not in (None, model.name) else None,
        )

    @app.route("/v1/models", methods=["GET"])
    @api
    async def models(request: Request) -> bytes:
        cards = [card(m, name) for name, m in server.fleet.listed()]
        return json_response(request, {"object": "list", "data": cards})

    @app.route("/v1/models/<path:model_id>", methods=["GET"])
    @api
    async def model(request: Request, model_id: str) -> bytes:
        found = server.fleet.find(model_id, fallback=False)
        if found is None:
            raise model_not_found(model_id)
        return json_response(request, card(found, model_id))


DIALECT = Dialect(
    "openai",
    render.error_body,
    "OpenAIError",
    OPENAI_ERROR,
    endpoints=(
        Endpoint(
            "/v1/chat/completions",
            ChatCompletionRequest,
            "OpenAI chat completion",
            chat_turn,
            chat_builder,
        ),
        Endpoint(
            "/v1/completions",
            CompletionRequest,
            "OpenAI text completion",
            completion_turn,
            completion_builder,
        ),
    ),
    routes=model_routes,
    operations=(
        Operation(
            "/v1/models",
            "get",
            "v1_models",
            "Every model and exact alias, and whether each is loaded",
            responses={"200": described("An OpenAI model list.")},
        ),
        Operation(
            "/v1/models/{model_id}",
            "get",
            "v1_model",
            "A model, by name or alias",
            parameters=(
                {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}},
            ),
            responses={"200": described("An OpenAI model card.")},
            errors=("404",),
        ),
        embeddings.OPERATION,
    ),
)
