"""
What the API dialects and the request lifecycle see of the server: its
configuration (L{ServerConfig}) and the L{Host} protocol that
L{ds4tw._server.app.Server} satisfies. The dialects and L{ds4tw._api.lifecycle} are typed
against L{Host}, so nothing below L{ds4tw._server.app} imports it, and
L{ds4tw._server.app} imports the dialects' routes like any other module.

Covered by tests/unit/test_app.py and every dialect's route tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from klein import Klein
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.server import Request

    from .._engine.interface import Engine
    from .._engine.template import ChatTemplate
    from .._formats.reasoning import ReasoningParser
    from .._formats.tools.parsers import ToolCallParser
    from .._runtime.embedding import EmbeddingWorker
    from .._runtime.fleet import Fleet
    from .._runtime.metrics import Metrics
    from .._runtime.worker import Worker


@dataclass(frozen=True)
class ServerConfig:
    """
    @param keepalive: seconds of silence before a keepalive frame; 0 disables.
    @param max_queue: jobs allowed to wait for the model; more get 503.
    @param api_key: when set, /v1 routes need C{Authorization: Bearer KEY}
        or C{x-api-key: KEY}.
    @param cors_origins: origins allowed by CORS (C{"*"} for any).
    @param reasoning_parser: C{"auto"}, a name from
        L{ds4tw._formats.reasoning.REASONING_PARSERS} or C{"START,END"} tags.
    """

    keepalive: float = 15.0
    max_queue: int = 128
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    #: The largest request body accepted (413 before it is read, with
    #: L{ds4tw.LimitedSite}; 413 after, with a plain twisted.web Site).
    max_body_bytes: int = 16 * 1024 * 1024
    #: Seconds for a whole request to arrive (L{ds4tw.LimitedSite}).
    request_timeout: float = 60.0
    #: Bytes a stream holds for a client that stopped reading; past this
    #: the job is cancelled ("client not reading") and the connection closed.
    max_unsent_bytes: int = 1024 * 1024
    #: How the model marks reasoning (L{ds4tw._formats.reasoning.reasoning_parser});
    #: C{"auto"} reads it from the chat template.
    reasoning_parser: str = "auto"
    #: On /v1/messages, keep streams alive with Anthropic's own
    #: C{event: ping} frame instead of an SSE comment.
    anthropic_ping: bool = False
    #: Reasoning tokens a request may spend before the engine closes the
    #: block (a request's own budget wins); None for no limit.
    reasoning_budget: int | None = None
    #: How the model writes tool calls (L{ds4tw._formats.tools.parsers}); C{"auto"}
    #: reads it from the chat template.
    tool_call_parser: str = "auto"
    #: Seconds a shutdown (SIGTERM) gives the running and queued jobs to
    #: finish before cancelling them; 0 cancels at once (docs/operations.md).
    drain_timeout: float = 30.0
    #: Serve the chat page at C{/} (docs/ui.md); C{twistd ds4tw --no-ui} turns it off.
    ui: bool = True


class EmbeddingTarget(Protocol):
    """The model that answers an embeddings request, as the route sees it."""

    @property
    def model_id(self) -> str: ...

    @property
    def n_ctx(self) -> int:
        """The most tokens one input may have."""

    @property
    def n_vocab(self) -> int: ...

    @property
    def n_embd(self) -> int:
        """The vectors' length."""

    @property
    def worker(self) -> EmbeddingWorker: ...

    def tokenize(self, text: str) -> list[int]:
        """Any thread; the route calls it in the offload pool."""


class Host(Protocol):
    """
    The server as a dialect's routes and the request lifecycle use it:
    its shared parts, and one model's (the server itself answers for
    its first model; L{for_model} gives the host of the model a request
    names).
    """

    @property
    def app(self) -> Klein: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def config(self) -> ServerConfig: ...

    @property
    def worker(self) -> Worker: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def clock(self) -> IReactorTime: ...

    @property
    def fleet(self) -> Fleet:
        """Every model of the server (C{/v1/models}, C{/health})."""
        ...

    async def for_model(self, name: str | None) -> Host:
        """
        The host of the model that serves C{name}, with its prompt side
        ready; raises the 404 C{model_not_found} when no model does.
        """
        ...

    @property
    def model_name(self) -> str:
        """The name of this host's model (C{/v1/models})."""
        ...

    async def embedding_target(self, name: str | None) -> EmbeddingTarget:
        """
        The embedding model that serves C{name}, its vocabulary ready; a
        404 C{model_not_found}, or a 400 for a model that does not embed.
        """
        ...

    def chat_template(self) -> ChatTemplate: ...

    def reasoning_parser(self) -> ReasoningParser: ...

    def kept_special(self) -> frozenset[int]: ...

    def tool_parser(self) -> ToolCallParser: ...

    def authorize(self, request: Request) -> None: ...

    def cors(self, request: Request) -> None: ...
