"""
Chat templates: a model's Jinja template rendered as Hugging Face renders
it (llama-cpp-python's C{Jinja2ChatFormatter}: the sandbox, C{tojson},
C{raise_exception}, C{strftime_now}), and what the template can do with
tools.

Both engines render through L{ChatTemplate}, so the scripted engine used
by the unit tests renders a template exactly as the real one does.

Covered by tests/unit/test_openai_tools.py and tests/integration/test_llama_engine.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ._engine import ChatPrompt

#: ChatML, for GGUF files that carry no template (and the scripted engine).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.source = source
        self._formatter = Jinja2ChatFormatter(
            template=source, eos_token=eos_token, bos_token=bos_token
        )

    def render(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> ChatPrompt:
        result = self._formatter(messages=list(messages), **kwargs)  # type: ignore[arg-type]
        stops = tuple(s for s in (result.stop or []) if s) if isinstance(result.stop, list) else ()
        return ChatPrompt(result.prompt, stops)

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
