"""
A thinking model forced to call a tool, end to end: `twistd -n ds4tw`
with the demo model under a ChatML template that opens C{<think>} in its
generation prompt (as Qwen3 and DeepSeek-R1 templates do), driven by the
official SDKs.

The forced call's grammar must leave the model its reasoning first and
make it close the block before the call (a call written inside the
block would be reasoning, lost to the client); the small model never
closes its block on its own, so the reasoning budget (Anthropic's
C{budget_tokens}, C{--reasoning-budget} for chat) is what closes it, the
engine writing C{</think>} in its place under the grammar. The client
gets a thinking block and a call whose input validates against the
tool's schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from jsonschema import validate

from ds4tw._engine.template import CHATML_TEMPLATE

from .conftest import WEATHER_SCHEMA, Twistd, start_twistd, stop_twistd

THINK_TEMPLATE = CHATML_TEMPLATE.replace(
    "'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'"
)
QUESTION = "What is the weather in Paris?"
BUDGET = 8


@pytest.fixture(scope="module")
def twistd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    tmp = tmp_path_factory.mktemp("thinking")
    template = Path(tmp / "think.jinja")
    template.write_text(THINK_TEMPLATE, encoding="utf-8")
    server = start_twistd(
        tmp,
        "--chat-template",
        str(template),
        "--reasoning-budget",
        str(BUDGET),
        "--ctx",
        "2048",
    )
    yield server
    stop_twistd(server)


def test_anthropic_forced_call_after_budgeted_thinking(twistd: Twistd) -> None:
    client = anthropic.Anthropic(base_url=twistd.url, api_key="x", max_retries=0)
    message = client.messages.create(
        model="demo",
        max_tokens=200,
        messages=[{"role": "user", "content": QUESTION}],
        tools=[{"name": "get_weather", "description": "Weather.", "input_schema": WEATHER_SCHEMA}],
        tool_choice={"type": "any"},
        thinking={"type": "enabled", "budget_tokens": 4},
        extra_body={"temperature": 0},
    )
    kinds = [b.type for b in message.content]
    assert kinds[0] == "thinking" and kinds[-1] == "tool_use", kinds
    thinking: Any = message.content[0]
    call: Any = message.content[-1]
    assert thinking.thinking.strip()
    assert "</think>" not in thinking.thinking and "<tool_call>" not in thinking.thinking
    validate(call.input, WEATHER_SCHEMA)
    assert message.stop_reason == "tool_use"
    # The request's own budget (4) won over the server's (8).
    assert message.usage.output_tokens < 200


def test_chat_forced_call_after_the_servers_budget(twistd: Twistd) -> None:
    client = openai.OpenAI(base_url=f"{twistd.url}/v1", api_key="x", max_retries=0)
    weather: Any = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather.",
            "parameters": WEATHER_SCHEMA,
        },
    }
    reply = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": QUESTION}],
        tools=[weather],
        tool_choice="required",
        temperature=0,
        max_tokens=200,
    )
    message = reply.choices[0].message
    reasoning = getattr(message, "reasoning_content", None) or (message.model_extra or {}).get(
        "reasoning_content"
    )
    assert reasoning and reasoning.strip()
    assert message.tool_calls and message.tool_calls[0].function.name == "get_weather"
    validate(json.loads(message.tool_calls[0].function.arguments), WEATHER_SCHEMA)
    assert reply.choices[0].finish_reason == "tool_calls"
    details = reply.usage.completion_tokens_details if reply.usage else None
    # At most the budget, plus the closing tag's tokens, counted as reasoning.
    assert details is not None and details.reasoning_tokens is not None
    assert details.reasoning_tokens <= BUDGET + 4
