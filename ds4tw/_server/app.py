"""
L{Server}: one model behind a Klein app. It is a Twisted service (start
it, or give it a parent) and its L{Server.resource} mounts anywhere in a
twisted.web tree, including under a Klein branch route of another app.

This module owns the server's own routes and what every route shares:
auth, CORS, health, metrics, C{/openapi.json} (L{ds4tw._api.openapi}),
JSON 404/405/500 in the shape of the dialect that owns the path. Every
registered dialect's routes are mounted from L{ds4tw._api.registry} by
L{ds4tw._api.serve.mount}.

Covered by tests/unit/test_app.py, tests/unit/test_openapi.py and
tests/unit/test_embedding.py.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from klein import Klein
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from .._api.dialect import dialect_for
from .._api.host import EmbeddingTarget, Host, ServerConfig
from .._api.ids import header_text, request_key
from .._api.openai.embeddings import WorkerTarget
from .._api.openapi import openapi_document
from .._api.registry import DIALECTS
from .._api.routing import ErrorBody, error_response, json_response, unexpected
from .._api.serve import mount
from .._engine.interface import Engine, ReportsSettings
from .._engine.template import ChatTemplate
from .._errors import (
    invalid,
    method_not_allowed,
    model_not_found,
    not_found,
    not_ready,
    unauthorized,
)
from .._formats.reasoning import ReasoningParser
from .._formats.tools.parsers import ToolCallParser
from .._runtime.fleet import Fleet, Model
from .._runtime.joblog import log_job
from .._runtime.metrics import CONTENT_TYPE_LATEST, Metrics
from .._runtime.modelthread import ModelThread
from .._runtime.worker import ModelState, Worker, WorkerThreads
from .hosts import ModelHost
from .ui import add_routes as ui_routes

log = Logger()


class Server(MultiService):
    """
    Serve C{engine}, or several C{models}, over every registered API
    dialect (L{ds4tw._api.registry}).

    One engine is loaded at start and serves every model name (as a
    single C{--model} server always has); so are C{models} with
    C{preload}. Several models are loaded on
    demand within C{memory_budget} bytes, and idle ones unloaded after
    C{idle_unload} seconds (L{ds4tw._runtime.fleet.Fleet}); a request
    is served by the model its name or an alias matches, or by
    C{default}, or answered with a 404 C{model_not_found}.

    @param threads: the model-thread boundary, which every model shares;
        defaults to a real thread (L{ds4tw._runtime.modelthread.ModelThread}).
        Tests pass L{ds4tw.testing.SteppedThreads}.
    @param clock: time source for keepalives; defaults to the reactor.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        config: ServerConfig | None = None,
        *,
        models: Sequence[Model] | None = None,
        preload: bool | None = None,
        default: str | None = None,
        memory_budget: int | None = None,
        idle_unload: float | None = None,
        clock: IReactorTime | None = None,
        threads: WorkerThreads | None = None,
        reactor: Any = None,
    ) -> None:
        super().__init__()
        if (engine is None) == (models is None):
            raise TypeError("Server takes an engine or models, not both")
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config or ServerConfig()
        self._openapi: bytes | None = None
        self.clock: IReactorTime = clock or reactor
        single = models is None if preload is None else preload
        if models is None:
            assert engine is not None
            models = [Model(engine)]
        if single and default is None:
            # One model, loaded at start, serves every name (as ds4tw always has).
            default = models[0].name
        self.fleet = Fleet(
            models,
            threads=threads or ModelThread(reactor),
            clock=self.clock,
            max_queue=self.config.max_queue,
            drain_timeout=self.config.drain_timeout,
            on_demand=not single,
            default=default,
            budget=memory_budget,
            idle_unload=idle_unload,
        )
        self.fleet.setServiceParent(self)
        self._hosts = {
            m.name: ModelHost(self, m) for m in self.fleet.models.values() if m.engine is not None
        }
        #: The first chat model's host: what C{engine}, C{worker} and the
        #: parser methods of the server itself answer for (None: the server
        #: runs embedding models only).
        self._main = next(iter(self._hosts.values()), None)
        self.metrics = Metrics()
        workers = self._workers()
        self.metrics.watch(
            lambda: sum(w.queue_depth for w in workers),
            lambda: any(w.busy for w in workers),
            lambda: all(w.ready for w in workers) if single else self._accepting(),
            lambda: sum(w.slots_busy for w in workers),
            lambda: sum(w.slots for w in workers if w.ready or single),
        )
        self.metrics.watch_cache(
            lambda: [m.engine for m in self.fleet.models.values() if m.engine is not None]
        )
        self.metrics.watch_models(self.fleet)
        for host in self._hosts.values():
            host.worker.observers += [self.metrics.job_ended, log_job]
            host.worker.step_observers.append(self.metrics.step_done)
            host.worker.loaded.addCallback(self._log_parsers, host)
        self.app = Klein()
        # werkzeug answers a path with repeated slashes by a redirect to the
        # merged one, which escapes Klein as a 500; _Tagged collapses them
        # before routing, so this only keeps a path that bypassed it a 404.
        self.app.url_map.merge_slashes = False
        self._routes()
        # Each registered dialect's routes (typed against _host.Host, so
        # none of them imports this module).
        for dialect in DIALECTS:
            mount(self, dialect)
        if self.config.ui:
            ui_routes(self)

    @property
    def _main_host(self) -> ModelHost:
        if self._main is None:
            raise AttributeError("this server runs no chat model")
        return self._main

    @property
    def engine(self) -> Engine:
        """The first chat model's engine (the only one of a single-model server)."""
        return self._main_host.engine

    @property
    def worker(self) -> Worker:
        """The first chat model's worker (the only one of a single-model server)."""
        return self._main_host.worker

    @property
    def model_name(self) -> str:
        """The first chat model's name."""
        return self._main_host.model_name

    async def for_model(self, name: str | None) -> Host:
        """
        The host of the model that serves C{name} (L{Fleet.find}), once
        its prompt side is ready; a 404 C{model_not_found} when none does.
        """
        model = self.fleet.find(name)
        if model is None:
            raise model_not_found(name or "")
        if model.engine is None:
            raise invalid(
                f"the model {model.name} is an embedding model: use /v1/embeddings", "model"
            )
        try:
            await self.fleet.prepared(model)
        except Exception as e:
            raise not_ready(f"the model {model.name} cannot be read: {e}") from e
        return self._hosts[model.name]

    async def embedding_target(self, name: str | None) -> EmbeddingTarget:
        """
        The model that serves C{name}'s embeddings (L{Fleet.find}), its
        vocabulary ready: a 404 C{model_not_found} when no model serves the
        name, a 400 when that model does not embed.
        """
        model = self.fleet.find(name)
        if model is None:
            raise model_not_found(name or "")
        worker = model.embedding_worker
        if worker is None:
            raise invalid(
                f"the model {model.name} does not serve embeddings (serve it with --embeddings, "
                'or in a models file with kind = "embedding" or embeddings = true)',
                "model",
            )
        try:
            await self.fleet.prepared(model)
        except Exception as e:
            raise not_ready(f"the model {model.name} cannot be read: {e}") from e
        return WorkerTarget(worker)

    def _accepting(self) -> bool:
        return not any(u.runner.draining for u in self.fleet.units)

    def _workers(self) -> list[Worker]:
        """The chat models' workers."""
        return [m.worker for m in self.fleet.models.values() if m.engine is not None]

    def stopService(self) -> Deferred[None]:
        """Drain the workers (L{Worker.stopService}) and log how that went."""
        workers = self._workers()
        log.info(
            "ds4tw: shutting down: draining {running} running and {queued} queued jobs "
            "for up to {timeout}s",
            running=sum(w.slots_busy for w in workers),
            queued=sum(w.queue_depth for w in workers),
            timeout=self.config.drain_timeout,
        )
        d: Deferred[None] = super().stopService()

        def done(result: object) -> object:
            results = [w.drain_result for w in workers if w.drain_result is not None]
            if results:
                log.info(
                    "ds4tw: shut down after {seconds:.1f}s: {drained} drained, {cancelled} "
                    "cancelled at the drain timeout, {other} ended otherwise",
                    seconds=max(r.seconds for r in results),
                    drained=sum(r.drained for r in results),
                    cancelled=sum(r.cancelled for r in results),
                    other=sum(r.other for r in results),
                )
            return result

        return d.addBoth(done)

    def resource(self) -> IResource:
        return _Tagged(self.app.resource())

    def chat_template(self) -> ChatTemplate:
        """The first model's chat template (L{ModelHost.chat_template})."""
        return self._main_host.chat_template()

    def tool_parser(self) -> ToolCallParser:
        """The first model's tool-call parser (L{ModelHost.tool_parser})."""
        return self._main_host.tool_parser()

    def parsers(self) -> dict[str, str]:
        """The first model's parsers (L{ModelHost.parsers})."""
        return self._main_host.parsers()

    def reasoning_parser(self) -> ReasoningParser:
        """The first model's reasoning parser (L{ModelHost.reasoning_parser})."""
        return self._main_host.reasoning_parser()

    def kept_special(self) -> frozenset[int]:
        """The first model's kept special tokens (L{ModelHost.kept_special})."""
        return self._main_host.kept_special()

    def _model_health(self, model: Model) -> dict[str, Any]:
        """One model's entry in C{/health}: where it is, its queue, its memory."""
        runner = model.runner
        memory = model.memory_use()
        entry: dict[str, Any] = {
            "name": model.name,
            "aliases": list(model.aliases),
            "kind": model.kind,
            "state": runner.state.value,
            "queue_depth": runner.queue_depth,
            "memory": {
                "weights_bytes": memory.weights,
                "kv_bytes": memory.kv,
                "compute_bytes": memory.compute,
                "cache_bytes": memory.cache,
                "total_bytes": model.memory(),
                "measured": memory.measured and model.memory_bytes is None,
            },
            "loads": runner.loads,
            "unloads": dict(model.unloads),
            "idle_seconds": round(self.clock.seconds() - runner.last_used, 1),
        }
        if model.engine is not None:
            entry["slots"] = model.worker.slots
            entry["slots_busy"] = model.worker.slots_busy
        embedding = model.embedding_worker
        if embedding is not None and model.engine is not None:
            # A chat model's own embedding context (--embeddings).
            entry["embeddings"] = {"state": embedding.state.value, "loads": embedding.loads}
        if runner.state is ModelState.LOADING:
            entry["load_progress"] = round(runner.load_progress, 3)
        if runner.load_error is not None:
            entry["load_error"] = runner.load_error.getErrorMessage()
        if runner.losses:
            # Lost under its requests (an RPC worker gone), reloaded with back-off.
            entry["losses"] = runner.losses
            entry["lost"] = runner.lost_reason
            reload_in = runner.reload_in
            if reload_in is not None:
                entry["reload_in_seconds"] = round(reload_in, 1)
        if runner.ready and model.name in self._hosts:
            entry["parsers"] = self._hosts[model.name].parsers()
        return entry

    def _log_parsers(self, result: object, host: ModelHost) -> object:
        log.info(
            "{model}: parsers: tool calls {tool_call}, reasoning {reasoning} "
            "(configured: {tc}, {rp})",
            model=host.model_name,
            tc=host.tool_call_parser_name,
            rp=host.reasoning_parser_name,
            **host.parsers(),
        )
        return result

    # -- shared request handling -----------------------------------------

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        bearer = header_text(request, b"authorization")
        given = (
            bearer[7:]
            if bearer.lower().startswith("bearer ")
            else header_text(request, b"x-api-key")
        )
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise unauthorized()

    def cors(self, request: Request) -> None:
        origins = self.config.cors_origins
        if not origins:
            return
        origin = header_text(request, b"origin")
        if "*" in origins:
            request.setHeader(b"access-control-allow-origin", b"*")
        elif origin in origins:
            request.setHeader(b"access-control-allow-origin", origin.encode())
            request.setHeader(b"vary", b"Origin")
        else:
            return
        # A page's script may read these (the SDKs do: request ids in
        # their errors, Retry-After for their back-off).
        request.setHeader(b"access-control-expose-headers", _EXPOSE_HEADERS)

    def _routes(self) -> None:
        app = self.app

        @app.route("/health", methods=["GET"])
        def health(request: Request) -> bytes:
            workers = self._workers()
            w = self._main.worker if self._main is not None else None
            single = w is not None and not w.on_demand
            if not self._accepting():
                # From the first moment of a shutdown: load balancers stop sending.
                status = "draining"
            elif single and w is not None:
                status = "ok" if w.ready else ("error" if w.load_error else "loading")
            else:
                # Models load on demand: the server is ready before any is.
                status = "ok"
            first = next(iter(self.fleet.models.values()))
            payload: dict[str, Any] = {
                "status": status,
                "model": self.engine.model_id if self._main is not None else first.name,
                "queue_depth": sum(x.queue_depth for x in workers),
                "busy": any(x.busy for x in workers),
                "slots": w.slots if w is not None else 0,
                "slots_busy": sum(x.slots_busy for x in workers),
            }
            if single and w is not None and w.ready:
                if isinstance(self.engine, ReportsSettings):
                    # As llama.cpp took them (docs/operations.md, "Engine settings").
                    payload["engine"] = self.engine.settings
                payload["parsers"] = self.parsers()
            payload["models"] = [self._model_health(m) for m in self.fleet.models.values()]
            payload["memory"] = {
                "budget_bytes": self.fleet.budget,
                "used_bytes": self.fleet.used(),
            }
            ok = status == "ok"
            if not ok:
                request.setHeader(b"retry-after", b"5")
            return json_response(request, payload, 200 if ok else 503)

        @app.route("/metrics", methods=["GET"])
        def metrics(request: Request) -> bytes:
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            return self.metrics.render()

        @app.route("/openapi.json", methods=["GET"])
        def openapi(request: Request) -> bytes:
            self.cors(request)
            if self._openapi is None:
                self._openapi = json.dumps(
                    openapi_document(DIALECTS, bool(self.config.api_key), self.config.ui)
                ).encode()
            request.setHeader(b"content-type", b"application/json")
            return self._openapi

        # Routing misses and unhandled errors outside a dialect's handlers
        # (which catch their own): JSON in the path's dialect, never
        # twisted.web's or werkzeug's HTML.
        @app.handle_errors(NotFound, MethodNotAllowed)
        def no_route(request: Any, failure: Failure) -> bytes:
            self.cors(request)
            path = request.path.decode("latin-1")
            method = request.method.decode("latin-1")
            valid = getattr(failure.value, "valid_methods", None) or []
            allowed = sorted(m for m in valid if m not in ("OPTIONS", "HEAD"))
            if failure.check(MethodNotAllowed) and allowed:
                error = method_not_allowed(method, path, allowed)
            else:  # no route; or only the CORS preflight's catch-all matched
                error = not_found(path)
            return error_response(request, error, _error_body_for(path))

        @app.handle_errors(Exception)
        def failed(request: Any, failure: Failure) -> bytes | Deferred[None]:
            return unexpected(request, failure, _error_body_for(request.path.decode("latin-1")))

        @app.route("/v1/<path:rest>", methods=["OPTIONS"])
        def preflight(request: Request, rest: str) -> bytes:
            self.cors(request)
            request.setHeader(b"access-control-allow-methods", b"GET, POST, OPTIONS")
            request.setHeader(b"access-control-allow-headers", _allowed_headers(request))
            if request.responseHeaders.hasHeader(b"access-control-allow-origin"):
                # The answer depends on the headers asked for: a cache must not
                # give one page's preflight to another's.
                vary = b"Origin, Access-Control-Request-Headers"
                request.setHeader(b"vary", vary)
            request.setHeader(b"access-control-max-age", b"600")
            request.setResponseCode(204)
            return b""


#: What a preflight allows when it names no headers (or names them badly).
_ALLOW_HEADERS = (
    b"authorization, content-type, x-api-key, anthropic-version, openai-organization, "
    b"x-ds4tw-progress, x-session-id, x-request-id"
)
#: Response headers a cross-origin script may read.
_EXPOSE_HEADERS = b"x-request-id, x-session-id, retry-after"
#: A comma-separated list of header names (RFC 9110 tokens), nothing else.
_HEADER_NAMES = re.compile(
    rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*"
)


def _allowed_headers(request: Request) -> bytes:
    """
    The headers a preflight allows: those it asks for (as Starlette's
    CORS middleware does for vLLM). The origin is the boundary
    (C{--cors}) and the key is checked on the request itself; a fixed
    list only broke pages whose SDK sends headers of its own (the OpenAI
    and Anthropic JS SDKs send C{x-stainless-*}, C{anthropic-beta},
    C{anthropic-dangerous-direct-browser-access}). A bare C{*} would not
    do: it never covers C{Authorization}.
    """
    asked = (request.getHeader(b"access-control-request-headers") or b"").strip()
    if asked and _HEADER_NAMES.fullmatch(asked):
        return asked
    return _ALLOW_HEADERS


def _error_body_for(path: str) -> ErrorBody:
    """The error shape of the dialect that owns C{path} (L{dialect_for})."""
    return dialect_for(DIALECTS, path).error_body


class _Tagged(Resource):
    """
    The app's resource, with an C{X-Request-Id} on every response, a
    JSON 400 for a path that is not UTF-8 once unquoted (Klein would log
    an error and answer in plain text), a relative redirect from the
    mount point without its slash to the mount point (L{_to_mount_point}),
    and repeated slashes served as one (L{_collapse_slashes}).
    """

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: Request) -> Any:
        request_key(request)
        try:
            for segment in list(request.prepath or ()) + list(request.postpath or ()):
                segment.decode("utf-8")
        except UnicodeDecodeError:
            path = request.path.decode("latin-1")
            error = invalid("the request path is not UTF-8 once percent-decoded")
            return error_response(request, error, _error_body_for(path))
        if request.prepath and not request.postpath:
            return _to_mount_point(request, request.prepath[-1])
        request.postpath = _collapse_slashes(request.postpath or [])
        return self._inner.render(request)


def _collapse_slashes(segments: list[bytes]) -> list[bytes]:
    """
    The path's segments with the empty ones dropped, but a last one (a
    trailing slash, which is part of a route): C{/v1//chat/completions},
    what a client joining a base URL that ends in a slash asks for, is
    C{/v1/chat/completions}. Served as that path rather than redirected,
    since many clients follow a redirect of a POST with a GET, or without
    its body.
    """
    return [s for s in segments[:-1] if s] + segments[-1:]


def _to_mount_point(request: Request, segment: bytes) -> bytes:
    """
    A request for C{/llm} when the app is mounted at C{/llm/}: 308 to
    C{llm/}. Without the slash the chat page's relative URLs would
    resolve one level up. Relative, unlike werkzeug's own redirect, so
    that the scheme and host a proxy in front used are kept.
    """
    target = quote(segment, safe="") + "/"
    query = request.uri.partition(b"?")[2]
    if query:
        target += "?" + query.decode("latin-1")
    request.setResponseCode(308)
    request.setHeader(b"location", target.encode("latin-1"))
    return b""
