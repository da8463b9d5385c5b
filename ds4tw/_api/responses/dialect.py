"""
The OpenAI Responses dialect: C{POST /v1/responses} as a turn (schema.py
validates item by item, render.py answers), with OpenAI's error shape.

Covered by tests/unit/test_responses.py, tests/unit/test_dialects.py and
tests/integration/test_responses_sdk.py.
"""

from __future__ import annotations

from ..dialect import Begun, Dialect, Endpoint, Turn
from ..openai.dialect import OPENAI_ERROR
from ..openai.render import error_body
from . import render
from .schema import ResponsesRequest


def response_turn(req: ResponsesRequest) -> Turn:
    return Turn(
        "responses",
        "resp",
        req.stream,
        req.model,
        req.sampling,
        messages=req.template_messages(),
        reasoning=req.reasoning_settings(),
        tooling=req.tooling(),
        response_format=req.structured(),
        max_tokens=req.max_output_tokens,
        param="input",
    )


def response_builder(req: ResponsesRequest, begun: Begun) -> render.ResponseBuilder:
    return render.ResponseBuilder(
        begun.id,
        req.echo(begun.model, begun.params),
        req.thinking(),
        tool_kinds=req.tool_kinds(),
        logprobs=req.logprobs_wanted(),
        namespaces=req.tool_namespaces(),
    )


DIALECT = Dialect(
    "responses",
    error_body,
    "OpenAIError",
    OPENAI_ERROR,
    endpoints=(
        Endpoint(
            "/v1/responses",
            ResponsesRequest,
            "OpenAI Responses (stateless)",
            response_turn,
            response_builder,
            parse=ResponsesRequest.parse,
        ),
    ),
)
