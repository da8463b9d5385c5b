"""
Chat templates: a model's Jinja template rendered as Hugging Face renders
it (an immutable sandbox, C{trim_blocks}/C{lstrip_blocks}, loop controls,
C{tojson} with its options, C{raise_exception}, C{strftime_now}), and what
the template can do with tools.

Two things differ from Hugging Face's sandbox, each because real
templates need it:

  - the list methods templates use to build their own lists (C{append},
    C{extend}, C{insert}, C{pop}, C{remove}; Kimi-K2-Thinking's template)
    are allowed; everything else stays forbidden (dicts and sets stay
    immutable, attributes starting with C{_} stay hidden);
  - how a template wants an earlier call's arguments is probed once
    (L{ChatTemplate.arguments_as_text}): Hugging Face's convention is a
    mapping, but many templates (DeepSeek V3, R1 and V3.1) concatenate
    them into a string, which a mapping cannot be; llama.cpp probes each
    template the same way.

Both engines render through L{ChatTemplate}, so the scripted engine used
by the unit tests renders a template exactly as the real one does.
L{ChatTemplate.check} renders a plain conversation, so that a template
that cannot render fails when the model loads, naming the problem,
instead of on every request.

Covered by tests/unit/test_template.py, tests/unit/test_openai_tools.py
and tests/integration/test_llama_engine.py.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat prompt: the text and any extra stop strings."""

    text: str
    stop: tuple[str, ...] = field(default=())


#: ChatML, for GGUF files that carry no template (and the scripted engine).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: List methods a template may call on its own lists.
_LIST_METHODS = frozenset({"append", "extend", "insert", "pop", "remove"})


class TemplateError(ValueError):
    """The chat template cannot be compiled or cannot render a plain conversation."""


class _Sandbox(ImmutableSandboxedEnvironment):
    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, list) and attr in _LIST_METHODS:
            return True
        return super().is_safe_attribute(obj, attr, value)


class _GenerationTag(jinja2.ext.Extension):
    """Hugging Face's C{{% generation %}} block (for training masks): rendered as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face's filter (not jinja's, which escapes HTML characters).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _environment() -> _Sandbox:
    env = _Sandbox(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


#: The earlier call the arguments probe renders; its key is what it looks for.
_PROBE_ARGS = {"ds4tw_probe_key": "ds4tw_probe_value"}


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template does not compile: {e} (line {e.lineno})") from e
        self.check()

    def render(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> ChatPrompt:
        values = {"add_generation_prompt": True, "tools": None, **kwargs}
        text = self._template.render(
            messages=list(messages),
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **values,
        )
        return ChatPrompt(text, (self.eos_token,) if self.eos_token else ())

    def check(self) -> None:
        """Raise L{TemplateError}, naming the problem, if a plain conversation fails."""
        try:
            self.render([{"role": "user", "content": "Hello"}])
        except Exception as e:
            raise TemplateError(f"the chat template cannot render a conversation: {e}") from e

    @property
    def takes_tools(self) -> bool:
        """The template reads a C{tools} variable (Hugging Face's convention)."""
        return re.search(r"\btools\b", self.source) is not None

    @property
    def renders_tool_calls(self) -> bool:
        """Assistant turns' C{tool_calls} are written back by the template itself."""
        return "tool_calls" in self.source

    @property
    def renders_tool_results(self) -> bool:
        """Tool results (role C{tool}, or Llama 3's C{ipython}) have their own turns."""
        return re.search(r"""['"](tool|ipython)['"]""", self.source) is not None

    @functools.cached_property
    def arguments_as_text(self) -> bool:
        """
        Whether earlier calls' arguments must reach the template as JSON
        text: true when the template fails on a mapping or writes it as
        Python would (C{{'key': ...}}), and writes the text.
        """
        if not self.renders_tool_calls:
            return False
        as_mapping = self._probe([("ds4tw_probe", _PROBE_ARGS)])
        written = as_mapping is not None and "ds4tw_probe_value" in as_mapping
        if written and "'ds4tw_probe_key'" not in (as_mapping or ""):
            return False
        as_text = self._probe([("ds4tw_probe", json.dumps(_PROBE_ARGS))])
        return as_text is not None and '"ds4tw_probe_key"' in as_text

    @functools.cached_property
    def renders_parallel_calls(self) -> bool:
        """
        Whether a turn's second call reaches the prompt (gpt-oss's
        template writes only a turn's first call): probed once.
        """
        if not self.renders_tool_calls:
            return True
        second = {"ds4tw_probe_key": "ds4tw_probe_second"}
        calls: list[tuple[str, Any]] = [("ds4tw_probe", _PROBE_ARGS), ("ds4tw_probe", second)]
        if self.arguments_as_text:
            calls = [(n, json.dumps(a)) for n, a in calls]
        text = self._probe(calls)
        return text is None or "ds4tw_probe_second" in text

    def _probe(self, calls: list[tuple[str, Any]]) -> str | None:
        """A conversation with one assistant turn making C{calls}, rendered (None if refused)."""
        made = [
            {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(calls)
        ]
        results = [
            {"role": "tool", "tool_call_id": f"call_{i}", "name": n, "content": "ok"}
            for i, (n, _) in enumerate(calls)
        ]
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "", "tool_calls": made},
            *results,
            {"role": "user", "content": "Thanks"},
        ]
        tool = {
            "type": "function",
            "function": {
                "name": "ds4tw_probe",
                "description": "",
                "parameters": {"type": "object"},
            },
        }
        try:
            return self.render(messages, tools=[tool]).text
        except Exception:
            return None
