"""
The Ollama dialect: C{POST /api/chat} and C{/api/generate} as turns
(schema.py validates, render.py answers), the model routes
(L{ds4tw._api.ollama.models}), the embedding routes
(L{ds4tw._api.ollama.embed}), and Ollama's error shape (C{{"error": ...}})
for every path under C{/api/}.

Its streams are newline-delimited JSON (L{ds4tw._api.sse.NDJSON}), kept
alive like every other stream, by the same per-stream keepalive, with an
empty chunk of the answer's own kind (L{render.TurnBuilder.keepalive}).

A chat without messages or a generate without a prompt is Ollama's way
to load a model ahead of use, or with C{keep_alive: 0} to unload it: the
fleet does that (L{ds4tw._runtime.fleet.Fleet.warm}, C{release}) and the
answer is a done chunk whose C{done_reason} says which. A C{keep_alive}
on a turn sets how long the model stays loaded once idle, as Ollama's
does, where the server loads models on demand.

Covered by tests/unit/test_ollama.py, tests/unit/test_dialects.py and,
with the official C{ollama} library, tests/integration/test_ollama_sdk.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from ..._errors import invalid, model_not_found
from ..._runtime.fleet import Model
from ..._runtime.worker import NotReady
from ..._types import StreamRenderer
from ..dialect import Api, Begun, Dialect, Endpoint, Turn
from ..host import Host, ServerConfig
from ..prompt import admission_error
from ..sse import NDJSON
from . import embed, models, render
from .schema import ChatRequest, GenerateRequest

OLLAMA_ERROR: dict[str, Any] = {
    "type": "object",
    "description": "An Ollama-shaped error.",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


def _model(req: ChatRequest | GenerateRequest) -> str:
    if not req.model:
        # Ollama's words: it serves nothing without a name.
        raise invalid("model is required", "model")
    return req.model


def chat_turn(req: ChatRequest) -> Turn:
    tooling = req.tooling()
    return Turn(
        "ollama-chat",
        "chatcmpl",
        req.stream,
        _model(req),
        req.sampling,
        messages=req.template_messages(),
        reasoning=req.reasoning_settings(),
        tooling=tooling,
        response_format=req.structured(),
        max_tokens=req.opts.max_tokens(),
        context=req.opts.num_ctx,
    )


def generate_turn(req: GenerateRequest) -> Turn:
    """The prompt through the chat template (with C{system}), or with C{raw} as it is."""
    req.check()
    return Turn(
        "ollama-generate",
        "cmpl",
        req.stream,
        _model(req),
        req.sampling,
        messages=None if req.raw else req.template_messages(),
        text=req.prompt if req.raw else None,
        reasoning=None if req.raw else req.reasoning_settings(),
        response_format=req.structured(),
        max_tokens=req.opts.max_tokens(),
        param="prompt",
        context=req.opts.num_ctx,
    )


def chat_builder(req: ChatRequest, begun: Begun) -> render.TurnBuilder:
    return render.TurnBuilder("chat", begun.model, begun.started, req.show_thinking(), req.logprobs)


def generate_builder(req: GenerateRequest, begun: Begun) -> render.TurnBuilder:
    return render.TurnBuilder(
        "generate", begun.model, begun.started, req.show_thinking(), req.logprobs
    )


def keepalive_frame(
    _config: ServerConfig, renderer: StreamRenderer
) -> Callable[[str], bytes] | None:
    assert isinstance(renderer, render.TurnBuilder)
    return renderer.keepalive


def _served(server: Host, name: str) -> Model:
    model = server.fleet.find(name)
    if model is None:
        raise model_not_found(name)
    return model


async def _settle(d: Deferred[None]) -> None:
    try:
        await d
    except NotReady as e:
        raise admission_error(e) from e


def _early(
    kind: render.Kind,
) -> Callable[[Host, ChatRequest | GenerateRequest], Any]:
    async def early(server: Host, req: ChatRequest | GenerateRequest) -> dict[str, Any] | None:
        """
        Ollama's load and unload requests (no messages or prompt), and a
        turn's C{keep_alive}, which outlives the turn.
        """
        name = _model(req)
        model = _served(server, name)
        keep_alive = req.keep_alive_seconds()
        if req.is_load() and keep_alive == 0:
            if not server.fleet.on_demand:
                raise invalid(
                    "keep_alive: 0 asks to unload the model, but this server keeps its model "
                    "loaded (started with --model); a server started with --models or "
                    "--models-dir loads and unloads its models on demand",
                    "keep_alive",
                )
            await _settle(server.fleet.release(model))
            return render.loaded_body(kind, name, "unload")
        if keep_alive is not None:
            server.fleet.keep_alive(model, None if keep_alive < 0 else keep_alive)
        if not req.is_load():
            return None
        await _settle(server.fleet.warm(model))
        return render.loaded_body(kind, name, "load")

    return early


def routes(server: Host, api: Api) -> None:
    models.add_routes(server, api)
    embed.add_routes(server, api)


DIALECT = Dialect(
    "ollama",
    render.error_body,
    "OllamaError",
    OLLAMA_ERROR,
    endpoints=(
        Endpoint(
            "/api/chat",
            ChatRequest,
            "Ollama chat",
            chat_turn,
            chat_builder,
            early=_early("chat"),
        ),
        Endpoint(
            "/api/generate",
            GenerateRequest,
            "Ollama generate",
            generate_turn,
            generate_builder,
            early=_early("generate"),
        ),
    ),
    routes=routes,
    operations=(*models.OPERATIONS, *embed.OPERATIONS),
    owns=re.compile(r"/api/"),
    keepalive_frame=keepalive_frame,
    framing=NDJSON,
)
