"""
A turn's prompt, built off the reactor thread: the chat template renders
the messages (with the tools, the reasoning settings and any earlier
calls in the model's own syntax), the text is tokenized, and the grammar
the request needs (forced or lazy tool calls, structured output) is
built or found cached; then the context check, a 400 before anything is
queued. L{prompt_for} reads all of it from a dialect's L{Turn}.

Covered by tests/unit/test_openai_tools.py, tests/unit/test_anthropic_tools.py,
tests/unit/test_dialects.py and tests/unit/test_reasoning_budget.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from .._engine.interface import Grammar
from .._errors import APIError, ContextExceeded, busy, invalid, not_ready, shutting_down
from .._formats.normalise import normalise
from .._formats.reasoning.settings import ReasoningSettings
from .._formats.tools.parsers import GrammarCache
from .._formats.tools.prompt import template_inputs, without_thinking_alias
from .._formats.tools.spec import ResponseFormat, Tooling
from .._runtime.worker import NotReady, QueueFull, ShuttingDown
from .host import Host

if TYPE_CHECKING:
    from .dialect import Turn

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
    #: the tokens that close it (L{ds4tw._formats.reasoning.settings}).
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

    @param messages: Hugging Face chat messages (L{ds4tw._formats.tools.prompt}
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
        pending = server.worker.offload(f, *args)
    except NotReady as e:
        raise admission_error(e) from e
    return await pending


def max_tokens_for(
    server: Host,
    prompt: Prompt,
    requested: int | None,
    context: int | None = None,
    param: str = "messages",
) -> int:
    """
    What is left of the context, capped by what the client asked for.

    @param context: a smaller context the client asked to run in
        (Ollama's C{num_ctx}); a prompt that leaves it no room is a 400.
    """
    n_ctx = server.engine.n_ctx
    if context is not None and context < n_ctx:
        n_ctx = context
    room = n_ctx - len(prompt.tokens)
    if room < 1:
        raise context_exceeded(len(prompt.tokens), n_ctx, param)
    return room if requested is None else min(requested, room)


def admission_error(e: QueueFull | NotReady) -> APIError:
    if isinstance(e, QueueFull):
        return busy(str(e))
    if isinstance(e, ShuttingDown):
        return shutting_down()
    return not_ready(f"{e}; retry shortly")


async def prompt_for(server: Host, turn: Turn, *, check: bool = True) -> Prompt:
    """
    C{turn}'s prompt. C{check=False} counts a prompt even when it would not
    fit the context (a token count is how a client learns how much to
    cut), and builds no grammar (nothing will be sampled).
    """
    if turn.messages is None:
        assert turn.text is not None
        return await text_prompt(server, turn.text)
    return await chat_prompt(
        server,
        turn.messages,
        turn.reasoning,
        tooling=turn.tooling,
        response_format=turn.response_format,
        continuation=turn.continuation,
        param=turn.param,
        check=check,
        constrain=check,
    )
