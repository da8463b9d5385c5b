"""
What each dialect's reasoning settings become: template variables
(C{enable_thinking}, DeepSeek's C{thinking}, gpt-oss's
C{reasoning_effort}) and a budget that the engine enforces.
"""

from __future__ import annotations

from typing import Any

import pytest

from ds4tw._formats.reasoning.settings import ReasoningSettings
from ds4tw.testing import Reply

from .conftest import make_rig


def test_template_variables_for_each_setting() -> None:
    assert ReasoningSettings().template_kwargs() == {}
    assert ReasoningSettings(False).template_kwargs() == {
        "enable_thinking": False,
        "thinking": False,
    }
    assert ReasoningSettings(True, "xhigh").template_kwargs() == {
        "enable_thinking": True,
        "thinking": True,
        "reasoning_effort": "high",
    }
    # A word no template knows reaches none of them.
    assert ReasoningSettings(None, "turbo").template_kwargs() == {}


def test_the_clients_own_template_variables_win() -> None:
    settings = ReasoningSettings(False, "low", template={"enable_thinking": True, "x": 1})
    assert settings.template_kwargs() == {
        "enable_thinking": True,
        "thinking": False,
        "reasoning_effort": "low",
        "x": 1,
    }


def test_the_requests_budget_wins_and_thinking_off_has_none() -> None:
    assert ReasoningSettings(True, budget=10).budget_or(500) == 10
    assert ReasoningSettings(None).budget_or(500) == 500
    assert ReasoningSettings(None).budget_or(None) is None
    assert ReasoningSettings(False, budget=10).budget_or(500) is None


#: A prompt that ends inside the reasoning block (R1, Qwen3 thinking).
OPENS = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n<think>\n"
)
LONG_THOUGHT = Reply.of(*[" hmm"] * 40, "</think>", "\n\n", "It", " is", " 4.")


def anthropic(budget: int) -> dict[str, Any]:
    return {
        "model": "m",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "2+2?"}],
        "thinking": {"type": "enabled", "budget_tokens": budget},
    }


def test_anthropic_budget_tokens_closes_the_reasoning_in_the_models_place() -> None:
    rig = make_rig([LONG_THOUGHT], chat_template=OPENS)
    ex = rig.http.post("/v1/messages", anthropic(5))
    rig.threads.run_until_idle()
    blocks = ex.json()["content"]
    assert [b["type"] for b in blocks] == ["thinking", "text"]
    assert blocks[0]["thinking"] == " hmm" * 5
    assert blocks[1]["text"] == "It is 4."
    assert rig.engine.forced  # the closing tag was written for the model


@pytest.mark.parametrize("budget", [None, 3])
def test_reasoning_budget_option_applies_to_every_dialect(budget: int | None) -> None:
    rig = make_rig([LONG_THOUGHT], chat_template=OPENS, reasoning_budget=budget)
    ex = rig.chat()
    rig.threads.run_until_idle()
    message = ex.json()["choices"][0]["message"]
    assert message["reasoning_content"] == " hmm" * (40 if budget is None else budget)
    assert message["content"] == "It is 4."


def test_thinking_disabled_spends_no_budget() -> None:
    rig = make_rig([Reply.of("It", " is", " 4.")], reasoning_budget=0)
    ex = rig.http.post("/v1/messages", {**anthropic(1), "thinking": {"type": "disabled"}})
    rig.threads.run_until_idle()
    assert ex.json()["content"] == [{"type": "text", "text": "It is 4."}]
    assert not rig.engine.forced


def test_each_request_carries_the_kept_special_tokens_and_its_budget() -> None:
    rig = make_rig([LONG_THOUGHT], chat_template=OPENS)
    # As a real vocabulary would answer (the scripted one has no special tokens).
    rig.server._main._kept_special = frozenset({7, 9})
    rig.http.post("/v1/messages", anthropic(5))
    rig.threads.run_until_idle()
    (_, params) = rig.engine.calls[-1]
    assert params.keep_special == frozenset({7, 9})
    assert params.reasoning_budget == 5
    assert params.reasoning_close == tuple(rig.engine.tokenize("</think>", add_bos=False))
