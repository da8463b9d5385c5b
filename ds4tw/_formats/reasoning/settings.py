"""
What a request asks of the model's reasoning, in one dialect-neutral
shape, and how that reaches the chat template and the engine.

Each dialect says it its own way: chat's C{reasoning_effort} and
C{chat_template_kwargs}, Anthropic's C{thinking} (enabled with
C{budget_tokens}, adaptive, disabled) and C{output_config.effort},
Responses' C{reasoning.effort}. Templates read it under three names:
C{enable_thinking} (Qwen3, GLM-4.5/4.6, SmolLM3), C{thinking}
(DeepSeek-V3.1, whose default is off) and C{reasoning_effort} (gpt-oss:
low, medium or high). All that apply are passed; a template ignores the
names it does not read. The client's own C{chat_template_kwargs} win.

A budget (Anthropic's C{budget_tokens}, else C{--reasoning-budget})
ends the reasoning after that many tokens: the engine writes the
reasoning parser's closing text in the model's place (llama-server's
C{--reasoning-budget}).

Covered by tests/unit/test_reasoning_settings.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Efforts as gpt-oss's template spells them (it knows three).
_EFFORTS = {
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}


@dataclass(frozen=True)
class ReasoningSettings:
    #: Think or not; None leaves it to the template's default.
    enabled: bool | None = None
    #: The client's effort word (C{low}, C{medium}, C{high} and the like).
    effort: str | None = None
    #: Reasoning tokens allowed before the engine closes the block.
    budget: int | None = None
    #: Template variables the client set itself (chat's C{chat_template_kwargs}).
    template: Mapping[str, Any] = field(default_factory=dict)

    def template_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.enabled is not None:
            out["enable_thinking"] = self.enabled
            out["thinking"] = self.enabled
        effort = _EFFORTS.get(self.effort or "")
        if effort is not None:
            out["reasoning_effort"] = effort
        return {**out, **self.template}

    def budget_or(self, default: int | None) -> int | None:
        """The request's budget, else the server's; none when thinking is off."""
        if self.enabled is False:
            return None
        return self.budget if self.budget is not None else default
