"""
The request lifecycle, shared by every API dialect, once the prompt is
built (L{ds4tw._api.prompt}: off the reactor, a 400 before anything is
queued):

  1. the job: the output pipeline (reasoning, tool calls, stops) and the
     sampling the prompt's grammar and reasoning budget add;
  2. admission: the bounded queue (503 + Retry-After when full);
  3. streaming: headers at once, keepalive running, the dialect's
     renderer turning job events into frames; or collecting: the whole
     text for one JSON body;
  4. the client going away at any point cancels the job (the cancel path
     itself is in L{ds4tw._runtime.worker}).
  5. a job the shutdown cuts off (L{JobCancelled.by_shutdown}, at the
     drain timeout) still has a listener: a stream ends with the
     dialect's error frame, a non-streaming request gets a 503
     (L{ds4tw._api.routing.api}); docs/operations.md.

A dialect supplies only data (L{ds4tw._api.dialect}); the handler that
runs these steps in order is L{ds4tw._api.serve}.

Covered by tests/unit/test_keepalive.py, tests/unit/test_cancel.py and
tests/unit/test_openai_routes.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from .._engine.interface import BackendLost, SamplingParams
from .._errors import APIError, backend_lost, cut_off_by_shutdown
from .._formats.pipeline import OutputPipeline
from .._formats.reasoning import PlainSplitter
from .._formats.tools.spec import Tooling
from .._runtime.worker import Job, JobCancelled, NotReady, QueueFull
from .._types import (
    Collected,
    Collector,
    ContentText,
    Finish,
    Output,
    ReasoningText,
    Stage,
    StreamRenderer,
)
from .host import Host
from .prompt import Prompt, admission_error
from .sse import DISCONNECTED, SSE, Framing, SSEStream, progress_text, wants_progress

log = Logger()


def new_job(
    server: Host,
    prompt: Prompt,
    params: SamplingParams,
    label: str,
    reasoning: bool = True,
    tooling: Tooling | None = None,
) -> Job:
    """
    @param label: what the job's log line calls it (L{ds4tw._api.ids.job_label}).
    @param reasoning: split reasoning from content with the server's
        reasoning parser (chat turns); off for raw text completions.
    @param tooling: parse tool calls out of the content with the server's
        tool-call parser, when the request offers tools.
    """
    splitter = server.reasoning_parser().splitter(prompt.text) if reasoning else PlainSplitter()
    tools = None
    if tooling is not None and tooling.active:
        tools = server.tool_parser().splitter(tooling)
    single = tooling is not None and tooling.active and not tooling.parallel
    pipeline = OutputPipeline(params.stop, splitter, tools, single_call=single)
    grammar = prompt.grammar
    if grammar is not None and grammar.triggers:
        # A call marker quoted inside the reasoning block is not a call:
        # the lazy grammar's trigger is disarmed there.
        grammar = dataclasses.replace(grammar, armed=lambda: not pipeline.in_reasoning)
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    if reasoning:
        params = dataclasses.replace(
            params,
            keep_special=prompt.keep_special,
            reasoning_budget=prompt.reasoning_budget,
            reasoning_close=prompt.reasoning_close,
        )
    return Job(prompt.tokens, params, label=label, pipeline=pipeline)


def admit(server: Host, job: Job) -> None:
    """Queue C{job} or raise the dialect-neutral L{APIError} for why not."""
    try:
        server.worker.submit(job)
    except (QueueFull, NotReady) as e:
        raise admission_error(e) from e


def stream(
    server: Host,
    request: Request,
    job: Job,
    renderer: StreamRenderer,
    keepalive_frame: Callable[[str], bytes] | None = None,
    framing: Framing = SSE,
) -> Deferred[None]:
    """
    Admit C{job} and stream it. Raises L{APIError} (nothing sent yet) if
    it cannot be admitted; otherwise returns a Deferred that fires when
    the response is complete, or is cancelled by Klein on disconnect.
    """
    sse = SSEStream(
        request,
        server.clock,
        server.config.keepalive,
        stage=lambda: job.stage.value,
        on_lost=lambda: job.cancel(sse.lost_reason or DISCONNECTED),
        keepalive_frame=keepalive_frame,
        on_keepalive=server.metrics.keepalive_sent,
        max_unsent=server.config.max_unsent_bytes,
        progress=(
            functools.partial(progress_text, job)
            if framing.comments and wants_progress(request)
            else None
        ),
        framing=framing,
    )
    # Klein cancels the route's Deferred when the client goes: the same
    # path as the stream's own signals (SSEStream.lost).
    done: Deferred[None] = Deferred(lambda _: sse.lost(DISCONNECTED))

    def send(frames: list[bytes]) -> None:
        for f in frames:
            sse.write(f)

    class Listener:
        def stage_changed(self, stage: Stage) -> None:
            sse.report_progress()
            send(renderer.stage(stage))

        def output(self, event: Output) -> None:
            send(render_output(renderer, event))

    job.listener = Listener()
    admit(server, job)
    sse.start()
    send(renderer.opening())

    def end() -> None:
        sse.close()
        if not done.called:  # Klein may have cancelled it on disconnect
            done.callback(None)

    def finished(finish: Finish) -> None:
        send(renderer.finish(finish))
        end()

    def failed(f: Failure) -> None:
        # The headers are out: the error becomes the dialect's error
        # event, never a stream that merely stops and looks complete. A
        # client that disconnected is owed nothing; one whose job the
        # shutdown cut off is owed the dialect's final error frame.
        if not isinstance(f.value, JobCancelled):
            send(renderer.error(engine_failure(f)))
        elif f.value.by_shutdown:
            send(renderer.error(cut_off_by_shutdown()))
        end()

    job.deferred.addCallbacks(finished, failed)
    return done


def engine_failure(f: Failure) -> APIError:
    if isinstance(f.value, APIError):
        return f.value
    if isinstance(f.value, NotReady):
        # The model it waited for did not load (or cannot fit the budget).
        return admission_error(f.value)
    if isinstance(f.value, BackendLost):
        return backend_lost(str(f.value))
    return APIError(
        500, f"generation failed: {f.getErrorMessage()}", "server_error", code="engine_error"
    )


def render_output(renderer: StreamRenderer, event: Output) -> list[bytes]:
    if isinstance(event, ReasoningText):
        return renderer.reasoning(event.text)
    if isinstance(event, ContentText):
        return renderer.content(event)
    return renderer.tool_call(event)


async def collect(server: Host, job: Job) -> Collected:
    """Admit C{job} and wait for all of its output (non-streaming)."""
    collector = Collector()

    class Listener:
        def stage_changed(self, stage: Stage) -> None:
            pass

        def output(self, event: Output) -> None:
            collector.add(event)

    job.listener = Listener()
    admit(server, job)
    try:
        finish = await job.deferred
    except (JobCancelled, CancelledError):
        # Klein cancelled the route (the client left): a cancel, never a
        # 500 rendered to nobody.
        raise
    except Exception as e:
        raise engine_failure(Failure(e)) from e
    return collector.collected(finish)
