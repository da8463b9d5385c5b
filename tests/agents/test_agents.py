"""
Each real agent, headless, against ds4tw on the scripted engine, with its
default tools: a plain turn, and a tool round trip in which the agent runs
one of its own read-only tools and sends the result back. aider has no
tools: it edits files through a text format, so its round trip is a
SEARCH/REPLACE block it applies.

What these cannot show: whether a real model would choose the tools well;
the replies are scripted. They do show that what ds4tw streams is what
each agent parses, that its tool calls are ones the agent runs, and that
the conversation the agent sends back is one ds4tw serves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .agents import Agent, run_agent
from .conftest import (
    EDIT_PROMPT,
    HELLO,
    TOOL_PROMPT,
    Stage,
    final_answer,
    notes_text,
    secret,
)
from .recorder import Recorded

PLAIN_PROMPT = "PLAINTEST: say hello."


def conversation(posts: list[Recorded], agent: Agent) -> list[Recorded]:
    """The agent's main requests (not opencode's title requests), all answered 200."""
    assert posts, "the agent sent nothing"
    assert all(p.route == agent.route for p in posts), [p.path for p in posts]
    assert all(p.status == 200 for p in posts), [(p.path, p.status) for p in posts]
    return [p for p in posts if "You are a title generator" not in p.body.decode()]


@pytest.mark.parametrize("name", ["claude-code", "codex", "opencode", "aider"])
def test_a_plain_turn(stage: Stage, agents: dict[str, Agent], name: str, tmp_path: Path) -> None:
    agent = agents[name]
    before = len(stage.recorder.posts())
    run = run_agent(agent, PLAIN_PROMPT, stage.url, tmp_path / "home", stage.workdirs[name])
    assert run.returncode == 0 and not run.timed_out, run.describe()
    assert HELLO in run.stdout, run.describe()
    (turn,) = conversation(stage.posts_since(before), agent)
    assert PLAIN_PROMPT in turn.body.decode()
    assert turn.json()["stream"] is True
    # The session id the agent sends is ds4tw's session key (named in the
    # job's log line, so a proxy can keep the conversation on one replica).
    if agent.session_header is not None:
        key = turn.header(agent.session_header)
        assert key, turn.headers
        assert f" session={key} " in stage.server.log_text()
    else:
        assert not any("session" in k.lower() for k, _ in turn.headers), turn.headers


def tool_result(name: str, body: dict[str, Any]) -> tuple[str, str]:
    """
    The tool call the agent replays from ds4tw's answer and the result it
    sends for it, each in the agent's own dialect, matched by call id.
    """
    if name == "claude-code":
        *_, assistant, user = body["messages"]
        (use,) = [b for b in assistant["content"] if b["type"] == "tool_use"]
        (result,) = [b for b in user["content"] if b["type"] == "tool_result"]
        assert result["tool_use_id"] == use["id"]
        content = result["content"]
        text = content if isinstance(content, str) else json.dumps(content)
        return use["name"], text
    if name == "codex":
        calls = {i["call_id"]: i for i in body["input"] if i.get("type") == "function_call"}
        (output,) = [i for i in body["input"] if i.get("type") == "function_call_output"]
        out = output["output"]
        return calls[output["call_id"]]["name"], out if isinstance(out, str) else json.dumps(out)
    if name == "opencode":
        *_, assistant, tool = body["messages"]
        (call,) = assistant["tool_calls"]
        assert tool["role"] == "tool" and tool["tool_call_id"] == call["id"]
        return call["function"]["name"], tool["content"]
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "tool"), [("claude-code", "Read"), ("codex", "exec_command"), ("opencode", "read")]
)
def test_a_tool_round_trip(
    stage: Stage, agents: dict[str, Agent], name: str, tool: str, tmp_path: Path
) -> None:
    agent = agents[name]
    workdir = stage.workdirs[name]
    (workdir / "notes.txt").write_text(notes_text(name))
    before = len(stage.recorder.posts())
    prompt = TOOL_PROMPT.format(name=name)
    run = run_agent(agent, prompt, stage.url, tmp_path / "home", workdir)
    assert run.returncode == 0 and not run.timed_out, run.describe()
    # The scripted engine gives this answer only to a prompt that carries
    # the file's secret word: the tool ran and its result came back.
    assert final_answer(name) in run.stdout, run.describe()
    first, second = conversation(stage.posts_since(before), agent)
    assert prompt in first.body.decode() and secret(name) not in first.body.decode()
    called, result = tool_result(name, second.json())
    assert called == tool
    assert secret(name) in result


def test_aider_applies_a_scripted_edit_and_sends_no_tools(
    stage: Stage, agents: dict[str, Agent], tmp_path: Path
) -> None:
    agent = agents["aider"]
    workdir = stage.workdirs["aider"]
    notes = workdir / "notes.txt"
    notes.write_text(notes_text("aider"))
    before = len(stage.recorder.posts())
    run = run_agent(agent, EDIT_PROMPT, stage.url, tmp_path / "home", workdir, files=["notes.txt"])
    assert run.returncode == 0 and not run.timed_out, run.describe()
    assert notes.read_text() == "The secret word is MANGO.\n", run.describe()
    (turn,) = conversation(stage.posts_since(before), agent)
    body = turn.json()
    # Edits are text: aider sends the file itself and no tools at all.
    assert "tools" not in body and "tool_choice" not in body
    assert secret("aider") in json.dumps(body["messages"])
