"""
What an API dialect is: the few things that differ between the OpenAI,
Responses and Anthropic APIs (and whichever comes next), in one shape
that L{ds4tw._api.serve} runs the same way for all.

A dialect is a L{Dialect}: its error body, the paths whose errors take
that shape, its L{Endpoint}s (each a model turn: parse the body into the
dialect's pydantic request, read that into a uniform L{Turn}, and make a
L{Builder} for the answer), and any routes of its own beyond turns (model
lists, token counts). It is registered in L{ds4tw._api.registry}; the
routes, the error shapes and C{/openapi.json} come from there.

Covered by tests/unit/test_openapi.py, tests/unit/test_dialects.py and
each dialect's route tests.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel

from .._engine.interface import SamplingParams
from .._formats.reasoning.settings import ReasoningSettings
from .._formats.tools.spec import ResponseFormat, Tooling
from .._types import Collected, StreamRenderer
from .ids import IdKind
from .routing import ErrorBody, validated
from .sse import SSE, Framing

if TYPE_CHECKING:
    from .host import Host, ServerConfig

_R = TypeVar("_R", bound=BaseModel)


@dataclass(frozen=True)
class Turn:
    """
    One model turn, as every dialect's request reads into it.

    Exactly one of C{messages} (a chat turn: Hugging Face messages, through
    the chat template) and C{text} (a raw completion: text or token ids)
    is set.

    @param what: the job's kind in its log line (C{chat}, C{messages}...).
    @param id_kind: the shape of the answer's id (L{ds4tw._api.ids.response_id}).
    @param sampling: the request's sampling for a given token budget and
        the template's own stop strings.
    @param continuation: text the reply starts with (Anthropic's trailing
        assistant turn), appended after the generation prompt.
    @param max_tokens: what the client asked for; None for whatever the
        context leaves.
    @param param: the request field the prompt came from, for errors.
    @param context: a context smaller than the model's that the client
        asked to run in (Ollama's C{num_ctx}); None for the model's.
    """

    what: str
    id_kind: IdKind
    stream: bool
    model: str | None
    sampling: Callable[[int, tuple[str, ...]], SamplingParams]
    messages: Sequence[dict[str, Any]] | None = None
    text: str | list[int] | None = None
    continuation: str = ""
    reasoning: ReasoningSettings | None = None
    tooling: Tooling | None = None
    response_format: ResponseFormat | None = None
    max_tokens: int | None = None
    param: str = "messages"
    context: int | None = None


@dataclass(frozen=True)
class Begun:
    """What an answer's builder is made from, once its job exists."""

    #: The answer's id (C{chatcmpl-...}, C{msg_...}).
    id: str
    #: The model name the answer carries: the request's, else the engine's.
    model: str
    prompt_tokens: int
    #: The token budget the job runs with (the client's, capped by the context).
    max_tokens: int
    params: SamplingParams
    #: When the request's handler began (C{time.monotonic()}), for
    #: dialects that report a total duration (Ollama's).
    started: float = 0.0


class Builder(Protocol):
    """
    One answer in a dialect's shape, both ways: streamed frame by frame,
    or as one body. Both are built from the same pieces, so the two
    cannot disagree (tests/unit/test_render_agree.py).
    """

    def stream(self) -> StreamRenderer: ...

    def body(self, got: Collected) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Endpoint(Generic[_R]):
    """
    A route that runs one model turn.

    @param request: the pydantic model the body is validated as (and the
        request body's schema in C{/openapi.json}).
    @param turn: the validated request as a L{Turn}.
    @param builder: the answer's L{Builder}.
    @param parse: how a JSON body becomes the request, when it is more than
        C{request.model_validate} (the Responses API validates item by item).
    @param early: answers a request that is not a model turn itself, with
        a JSON body (Ollama's load and unload requests); None to run the
        turn.
    """

    path: str
    request: type[_R]
    summary: str
    turn: Callable[[_R], Turn]
    builder: Callable[[_R, Begun], Builder]
    parse: Callable[[dict[str, Any]], _R] | None = None
    early: Callable[[Host, _R], Awaitable[dict[str, Any] | None]] | None = None

    def read(self, payload: dict[str, Any]) -> _R:
        """The body as this endpoint's request, or a 400 naming the first bad field."""
        if self.parse is not None:
            return self.parse(payload)
        return validated(self.request, payload)

    @property
    def name(self) -> str:
        return self.path.strip("/").replace("/", "_")


#: How a dialect adds routes of its own: with the server and the wrapper
#: that gives a handler auth, CORS and errors in the dialect's shape.
Api = Callable[[Callable[..., Any]], Callable[..., Any]]
ExtraRoutes = Callable[["Host", Api], None]


@dataclass(frozen=True)
class Operation:
    """
    A route beyond the turns, as C{/openapi.json} describes it.

    @param body: the request body's pydantic model, for a POST.
    @param responses: extra responses beyond the dialect's errors.
    """

    path: str
    method: str
    operation_id: str
    summary: str
    body: type[BaseModel] | None = None
    parameters: tuple[dict[str, Any], ...] = ()
    responses: Mapping[str, Any] = field(default_factory=dict)
    errors: tuple[str, ...] = ()


#: A dialect's keepalive for one stream: from the server's configuration and
#: the answer's renderer, the frame for a stage name (None: an SSE comment).
KeepaliveFrame = Callable[["ServerConfig", StreamRenderer], Callable[[str], bytes] | None]


@dataclass(frozen=True)
class Dialect:
    """
    An API dialect.

    @param owns: the paths (searched, so a mount point may come first)
        whose routing errors (404, 405) take this dialect's shape; the
        first dialect in the registry whose pattern matches wins, and one
        with no pattern is the fallback.
    @param error_schema: the error body's JSON Schema, named
        C{error_name} in C{/openapi.json}.
    @param keepalive_frame: the frame that keeps one of this dialect's
        streams alive under the server's configuration, given the stage;
        None for an SSE comment naming the stage. It may ask the answer's
        renderer (an Ollama keepalive is an empty chunk naming the
        answer's model).
    @param framing: SSE, or NDJSON (which has no comments: its dialect
        gives a keepalive frame for every stream).
    """

    name: str
    error_body: ErrorBody
    error_name: str
    error_schema: Mapping[str, Any]
    endpoints: tuple[Endpoint[Any], ...] = ()
    routes: ExtraRoutes | None = None
    operations: tuple[Operation, ...] = ()
    owns: re.Pattern[str] | None = None
    keepalive_frame: KeepaliveFrame = lambda _config, _renderer: None
    framing: Framing = SSE

    def claims(self, path: str) -> bool:
        return self.owns is not None and self.owns.search(path) is not None


def dialect_for(dialects: Sequence[Dialect], path: str) -> Dialect:
    """The dialect whose shape an error on C{path} takes."""
    for d in dialects:
        if d.claims(path):
            return d
    return next(d for d in dialects if d.owns is None)
