"""
Chat templates as their authors wrote them: ds4tw's sandbox, the
arguments probe, and a template that cannot render failing at load.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ds4tw._engine.template import ChatTemplate, TemplateError
from ds4tw.testing import Reply, ScriptedEngine

from .conftest import make_rig

TEMPLATES = Path(__file__).parent.parent / "data" / "templates"


def source(name: str) -> str:
    return (TEMPLATES / name).read_text(encoding="utf-8")


def test_templates_may_build_their_own_lists() -> None:
    template = ChatTemplate(
        "{% set seen = [] %}{% for m in messages %}{% set _ = seen.append(m.role) %}"
        "{% endfor %}{{ seen | join(',') }}"
    )
    assert template.render([{"role": "user", "content": "a"}]).text == "user"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("{% set d = {} %}{{ d.update({'a': 1}) }}", "unsafe"),
        ("{{ messages.__class__.__mro__ }}", "__class__"),
        ("{{ raise_exception('no system role') }}", "no system role"),
    ],
)
def test_everything_else_stays_forbidden_and_fails_at_load(body: str, why: str) -> None:
    with pytest.raises(TemplateError, match="cannot render a conversation") as e:
        ChatTemplate(body)
    assert why in str(e.value)


def test_a_template_that_does_not_compile_names_the_line() -> None:
    with pytest.raises(TemplateError, match=r"does not compile: .*\(line 2\)"):
        ChatTemplate("ok\n{% for %}")


def test_a_model_whose_template_cannot_render_fails_at_load() -> None:
    with pytest.raises(TemplateError, match="unknown"):
        ScriptedEngine([], chat_template="{{ messages | unknown_filter }}")


@pytest.mark.parametrize(
    ("name", "as_text"),
    [
        ("deepseek-ai-DeepSeek-V3.1.jinja", True),
        ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", True),
        # Writes a mapping's keys and values itself (<arg_key>): a mapping.
        ("glm_4_5.jinja", False),
        ("moonshotai-Kimi-K2-Thinking.jinja", False),
        ("Qwen3-Coder.jinja", False),
        ("openai-gpt-oss-120b.jinja", False),
    ],
)
def test_the_arguments_probe_reads_what_each_template_needs(name: str, as_text: bool) -> None:
    assert ChatTemplate(source(name)).arguments_as_text is as_text


def test_a_follow_up_turn_renders_with_deepseek_v31s_own_template() -> None:
    """It concatenates the arguments: a mapping was a 400 before the probe."""
    rig = make_rig([Reply.of("Sunny.")], chat_template=source("deepseek-ai-DeepSeek-V3.1.jinja"))
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    ex = rig.chat(
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        ],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    )
    rig.threads.run_until_idle()
    assert ex.status == 200, ex.body
    (turn,) = [m for m in rig.engine.template_messages[-1] if m.get("tool_calls")]
    assert turn["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_hugging_face_extras_render() -> None:
    """What templates use beyond plain jinja2: tojson's options, strftime_now, loop controls."""
    template = ChatTemplate(
        "{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}|"
        "{{ {'x': '<é>'} | tojson(separators=(',', ':')) }}|"
        "{{ strftime_now('%Y') }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m.content }}{% continue %}never{% endfor %}"
        "{% generation %}kept{% endgeneration %}"
    )
    text = template.render(
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    ).text
    sorted_, compact, year, rest = text.split("|")
    assert sorted_ == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}'
    assert compact == '{"x":"<é>"}'  # not HTML-escaped, not ASCII-escaped
    assert len(year) == 4 and year.isdigit()
    assert rest == "akept"


def test_a_template_that_prints_a_mapping_as_python_gets_json_text() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{{ c.function.name }}({{ c.function.arguments }}){% endfor %}{% endfor %}"
    )
    assert template.arguments_as_text  # not {'ds4tw_probe_key': ...}


@pytest.mark.parametrize(
    ("name", "parallel"),
    [("openai-gpt-oss-120b.jinja", False), ("Qwen3-Coder.jinja", True)],
)
def test_the_parallel_calls_probe(name: str, parallel: bool) -> None:
    assert ChatTemplate(source(name)).renders_parallel_calls is parallel
