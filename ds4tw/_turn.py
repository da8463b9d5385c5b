"""
The request lifecycle, shared by every API dialect:

  1. prompt: chat template and tokenization off the reactor thread, then
     the context check (400 before anything is queued);
  2. admission: the bounded queue (503 + Retry-After when full);
  3. streaming: headers at once, keepalive running, the dialect's
     renderer turning job events into frames; or collecting: the whole
     text for one JSON body;
  4. the client going away at any point cancels the job (the cancel path
     itself is in L{ds4tw._worker}).
  5. a job the shutdown cuts off (L{JobCancelled.by_shutdown}, at the
     drain timeout) still has a listener: a stream ends with the
     dialect's error frame, a non-streaming request gets a 503
     (L{ds4tw._routing.api}); docs/operations.md.

A dialect supplies only a L{StreamRenderer} and its request/response
shapes.

Covered by tests/unit/test_keepalive.py, tests/unit/test_cancel.py and
tests/unit/test_openai_routes.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from ._engine import Grammar, SamplingParams
from ._errors import (
    APIError,
    ContextExceeded,
    busy,
    cut_off_by_shutdown,
    invalid,
    not_ready,
    shutting_down,
)
from ._host import Host
from ._normalise import normalise
from ._pipeline import OutputPipeline
from ._reasoning import PlainSplitter
from ._reasoning.settings import ReasoningSettings
from ._sse import DISCONNECTED, SSEStream, progress_text, wants_progress
from ._tools.parsers import GrammarCache
from ._tools.prompt import template_inputs, without_thinking_alias
from ._tools.spec import ResponseFormat, Tooling
from ._types import (
    Collected,
    Collector,
    ContentText,
    Finish,
    Output,
    ReasoningText,
    Stage,
    StreamRenderer,
)
from ._worker import Job, JobCancelled, NotReady, QueueFull, ShuttingDown

_GRAMMARS = GrammarCache()
log = Logger()


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    #: Stop strings implied by the chat template (e.g. its end-of-turn text).
    stops: tuple[str, ...] = ()
    #: The rendered text, when there was one (the reasoning parser looks
    #: at how it ends).
    text: str = ""
    #: What constrains sampling: forced or lazy tool calls, structured output.
    grammar: Grammar | None = None
    #: Whether the grammar was built for this request (not found cached).
    grammar_built: bool = False
    #: Reasoning tokens allowed before the engine closes the block, and
    #: the tokens that close it (L{ds4tw._reasoning.settings}).
    reasoning_budget: int | None = None
    reasoning_close: tuple[int, ...] = ()
    #: Special tokens whose text the parsers read (L{SamplingParams.keep_special}).
    keep_special: frozenset[int] = frozenset()


def context_exceeded(prompt_tokens: int, n_ctx: int, param: str) -> ContextExceeded:
    return ContextExceeded(
        400,
        f"This model's maximum context length is {n_ctx} tokens, but the prompt is "
        f"{prompt_tokens} tokens long (at least one token must be left to generate).",
        param=param,
        code="context_length_exceeded",
        prompt_tokens=prompt_tokens,
        limit=n_ctx - 1,
    )


async def chat_prompt(
    server: Host,
    messages: Sequence[dict[str, Any]],
    reasoning: ReasoningSettings | None = None,
    *,
    tooling: Tooling | None = None,
    response_format: ResponseFormat | None = None,
    continuation: str = "",
    param: str = "messages",
    check: bool = True,
    constrain: bool = True,
) -> Prompt:
    """
    Render C{messages} with the chat template and tokenize, and build the
    grammar the request needs, all off the reactor.

    @param messages: Hugging Face chat messages (L{ds4tw._tools.prompt}
        says how calls and results are shaped).
    @param reasoning: what the request asks of the model's reasoning: it
        reaches the template, and its budget the engine.
    @param tooling: the request's tools; they reach the template (or the
        fallback system text), and constrain sampling as the choice says.
    @param response_format: structured output, constrained by a grammar.
    @param continuation: text the model's reply starts with (Anthropic's
        trailing assistant turn), appended after the generation prompt.
    @param param: the request field the messages came from, for errors.
    @param check: refuse a prompt that does not fit the context (off when
        only counting tokens).
    @param constrain: build the grammar (off when only counting tokens:
        nothing will be sampled).
    """
    engine = server.engine
    reasoning = reasoning or ReasoningSettings()
    budget = reasoning.budget_or(server.config.reasoning_budget)

    def render() -> Prompt:
        parser = server.tool_parser()
        msgs, extra = template_inputs(normalise(messages), tooling, server.chat_template(), parser)
        kwargs = {**extra, **reasoning.template_kwargs()}
        try:
            chat = engine.apply_chat_template(msgs, **kwargs)
        except Exception as e:  # jinja's raise_exception and friends
            retry = without_thinking_alias(msgs)
            try:
                if retry is None:
                    raise
                chat = engine.apply_chat_template(retry, **kwargs)
            except Exception:
                raise invalid(f"the chat template rejected these messages: {e}", param) from e
        text = chat.text + continuation
        grammar, built = None, False
        roomy = False
        if constrain and tooling is not None and tooling.active:
            # With structured output too: calls, or an answer in the format.
            answer = None if response_format is None else response_format.json_schema()
            grammar, built = _GRAMMARS.get(parser, tooling, answer)
            roomy = parser.reasons_first
        elif constrain and response_format is not None:
            grammar, built = _GRAMMARS.json(response_format.schema)
        if grammar is not None and not grammar.triggers and not roomy:
            # From the first token: a thinking model still thinks first.
            grammar = server.reasoning_parser().before(grammar, text)
        # The template already carries BOS where the model wants one.
        tokens = engine.tokenize(text, add_bos=False)
        close: tuple[int, ...] = ()
        if budget is not None:
            close = tuple(engine.tokenize(server.reasoning_parser().close, add_bos=False))
        return Prompt(
            tokens,
            chat.stop,
            text,
            grammar,
            built and grammar is not None,
            budget if close else None,
            close,
            server.kept_special(),
        )

    prompt: Prompt = await _offload(server, render)
    if prompt.grammar is not None and prompt.grammar_built and prompt.grammar.loosened:
        # Once per tool set or schema (the cache keeps the grammar), naming
        # the tool and the place; the request is served all the same.
        log.warn(
            "grammar loosened where a schema cannot be expressed: {loosened}",
            loosened=prompt.grammar.loosened,
        )
    return checked(server, prompt, param) if check else prompt


async def text_prompt(server: Host, prompt: str | list[int]) -> Prompt:
    if isinstance(prompt, list):
        return checked(server, Prompt(prompt), "prompt")
    tokens: list[int] = await _offload(server, server.engine.tokenize, prompt)
    return checked(server, Prompt(tokens, text=prompt), "prompt")


def checked(server: Host, prompt: Prompt, param: str) -> Prompt:
    if not prompt.tokens:
        raise invalid("the prompt is empty", param)
    if len(prompt.tokens) >= server.engine.n_ctx:
        raise context_exceeded(len(prompt.tokens), server.engine.n_ctx, param)
    return prompt


async def _offload(server: Host, f: Callable[..., Any], *args: Any) -> Any:
    try:
        server.worker.check_ready()
    except NotReady as e:
        raise _admission_error(e) from e
    return await server.worker.threads.offload(f, *args)


def max_tokens_for(server: Host, prompt: Prompt, requested: int | None) -> int:
    """What is left of the context, capped by what the client asked for."""
    room = server.engine.n_ctx - len(prompt.tokens)
    return room if requested is None else min(requested, room)


def _admission_error(e: QueueFull | NotReady) -> APIError:
    if isinstance(e, QueueFull):
        return busy(str(e))
    if isinstance(e, ShuttingDown):
        return shutting_down()
    return not_ready(f"{e}; retry shortly")


def new_job(
    server: Host,
    prompt: Prompt,
    params: SamplingParams,
    label: str,
    reasoning: bool = True,
    tooling: Tooling | None = None,
    session: str | None = None,
    request_id: str | None = None,
) -> Job:
    """
    @param label: what the job's log line calls it.
    @param reasoning: split reasoning from content with the server's
        reasoning parser (chat routes); off for raw text completions.
    @param tooling: parse tool calls out of the content with the server's
        tool-call parser, when the request offers tools.
    @param session: the client's session key (C{X-Session-Id} or its
        agent's own header, L{ds4tw._routing.session_id}), added to the
        label.
    @param request_id: the request's C{X-Request-Id}, added to the label,
        so an operator finds a client's request in the log by the id the
        client saw.
    """
    if request_id is not None:
        label = f"{label} request={request_id}"
    if session is not None:
        label = f"{label} session={session}"
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
        raise _admission_error(e) from e


def stream(
    server: Host,
    request: Request,
    job: Job,
    renderer: StreamRenderer,
    keepalive_frame: Callable[[str], bytes] | None = None,
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
        stage=lambda: (job.stage if job.stage is not Stage.DONE else Stage.DECODE).value,
        on_lost=lambda: job.cancel(sse.lost_reason or DISCONNECTED),
        keepalive_frame=keepalive_frame,
        on_keepalive=server.metrics.keepalive_sent,
        max_unsent=server.config.max_unsent_bytes,
        progress=functools.partial(progress_text, job) if wants_progress(request) else None,
    )
    # Klein cancels the route's Deferred when the client goes: the same
    # path as the stream's own signals (SSEStream.lost).
    done: Deferred[None] = Deferred(lambda _: sse.lost(DISCONNECTED))

    def send(frames: list[bytes]) -> None:
        for f in frames:
            sse.write(f)

    class Listener:
        def stage_changed(self, stage: Stage) -> None:
            if stage is not Stage.DONE:
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
