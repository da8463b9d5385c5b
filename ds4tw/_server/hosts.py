"""
L{ModelHost}: the server as one request sees it once its model is known
(L{ds4tw._api.host.Host}): that model's engine, worker, chat template
and parsers, and the server's configuration, metrics and clock. The
dialects and the request lifecycle take a host, so they serve whichever
model the request named without knowing there are several.

Covered by tests/unit/test_fleet.py and tests/unit/test_app.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._engine.interface import Engine, special_token_ids
from .._engine.template import ChatTemplate
from .._formats.reasoning import ReasoningParser, reasoning_parser
from .._formats.tools.parsers import ToolCallParser, tool_call_parser
from .._runtime.fleet import Fleet, Model
from .._runtime.worker import Worker

if TYPE_CHECKING:
    from klein import Klein
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.server import Request

    from .._api.host import EmbeddingTarget, Host, ServerConfig
    from .._runtime.metrics import Metrics


class ModelHost:
    """One model of C{server}, with its template and parsers (read once, after prepare)."""

    def __init__(self, server: Host, model: Model) -> None:
        self.server = server
        self.model = model
        self._reasoning_parser: ReasoningParser | None = None
        self._kept_special: frozenset[int] | None = None
        self._template: ChatTemplate | None = None
        self._tool_parser: ToolCallParser | None = None
        # A bad name fails when the server is made, not per request.
        reasoning_parser(self.reasoning_parser_name)
        tool_call_parser(self.tool_call_parser_name)

    # -- what the server shares --------------------------------------------------

    @property
    def app(self) -> Klein:
        return self.server.app

    @property
    def config(self) -> ServerConfig:
        return self.server.config

    @property
    def metrics(self) -> Metrics:
        return self.server.metrics

    @property
    def clock(self) -> IReactorTime:
        return self.server.clock

    @property
    def fleet(self) -> Fleet:
        return self.server.fleet

    def authorize(self, request: Request) -> None:
        self.server.authorize(request)

    def cors(self, request: Request) -> None:
        self.server.cors(request)

    async def for_model(self, name: str | None) -> Host:
        return await self.server.for_model(name)

    async def embedding_target(self, name: str | None) -> EmbeddingTarget:
        return await self.server.embedding_target(name)

    # -- this model ------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        engine = self.model.engine
        assert engine is not None, "an embedding model has no chat host"
        return engine

    @property
    def worker(self) -> Worker:
        return self.model.worker

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def reasoning_parser_name(self) -> str:
        return self.model.reasoning_parser or self.server.config.reasoning_parser

    @property
    def tool_call_parser_name(self) -> str:
        return self.model.tool_call_parser or self.server.config.tool_call_parser

    def chat_template(self) -> ChatTemplate:
        """The engine's chat template, for what it can render (after prepare)."""
        if self._template is None:
            self._template = ChatTemplate(self.engine.chat_template)
        return self._template

    def tool_parser(self) -> ToolCallParser:
        """The tool-call parser: configured, or chosen from the template (after prepare)."""
        if self._tool_parser is None:
            self._tool_parser = tool_call_parser(
                self.tool_call_parser_name, self.engine.chat_template
            )
        return self._tool_parser

    def reasoning_parser(self) -> ReasoningParser:
        """The reasoning parser: configured, or chosen from the template (after prepare)."""
        if self._reasoning_parser is None:
            self._reasoning_parser = reasoning_parser(
                self.reasoning_parser_name, self.engine.chat_template
            )
        return self._reasoning_parser

    def parsers(self) -> dict[str, str]:
        """The parsers in use (what C{auto} read from the template), after prepare."""
        return {"tool_call": self.tool_parser().name, "reasoning": self.reasoning_parser().name}

    def kept_special(self) -> frozenset[int]:
        """
        The special tokens whose text the parsers read (gpt-oss's channels,
        Kimi's and DeepSeek's call markers); every other special token's
        text stays hidden from the client. Any thread, after prepare.
        """
        if self._kept_special is None:
            texts = (
                *self.tool_parser().preserved_tokens,
                *self.reasoning_parser().preserved_tokens,
            )
            self._kept_special = special_token_ids(self.engine, texts)
        return self._kept_special
