"""
The real coding agents against ds4tw: Claude Code, Codex, opencode and
aider at pinned releases (scripts/install-agents.sh installs them, outside
the checkout, when absent), each run headless in a HOME of its own against
`twistd -n ds4tw --model scripted:...` (the integration tests' helpers
start it), through a recording proxy (L{recorder.Recorder}) so the tests
see every request exactly as the agent sent it.

The scripted engine answers by what the prompt contains (its `when`
option): each test's prompt carries a keyword that selects its reply, and
a prompt that carries a tool's result (the secret word of the file the
tool read) gets the final answer. One server serves every agent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import Twistd, start_twistd, stop_twistd

from .agents import AGENTS, Agent, install
from .recorder import Recorded, Recorder

#: The plain turn's reply (the scripted engine's default reply here).
HELLO = "Hello from ds4tw, agent."
#: What opencode's side request for a session title gets.
TITLE = "Agent test title"
#: The prompt of the tool round trip, by agent: a keyword that picks the
#: tool call, and the question.
TOOL_PROMPT = "TOOLTEST-{name}: what is the secret word in notes.txt? Read the file."
#: aider's prompt: it has no tools, it edits files in a text format.
EDIT_PROMPT = "EDITTEST-aider: in notes.txt, change the secret word to MANGO."


def secret(name: str) -> str:
    """The word only the file holds, so only a tool's result carries it."""
    return f"{name.upper()}-PAPAYA-4177"


def final_answer(name: str) -> str:
    return f"The secret word is {secret(name)}, read by the tool."


def notes_text(name: str) -> str:
    return f"The secret word is {secret(name)}.\n"


def tool_call(name: str, arguments: dict[str, object]) -> str:
    """A hermes tool call, as the scripted engine's ChatML template writes one."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def aider_edit(new_word: str) -> str:
    """aider's 'diff' edit format: a SEARCH/REPLACE block for notes.txt."""
    return (
        "notes.txt\n```\n<<<<<<< SEARCH\n"
        f"{notes_text('aider')}=======\nThe secret word is {new_word}.\n"
        ">>>>>>> REPLACE\n```\n"
    )


def tool_calls(workdirs: dict[str, Path]) -> dict[str, str]:
    """Each agent's own read-only tool, on the notes file in its workdir."""
    return {
        # Read wants an absolute path.
        "claude-code": tool_call("Read", {"file_path": str(workdirs["claude-code"] / "notes.txt")}),
        # A plain function tool Codex ships (not one inside its namespace),
        # run in its read-only sandbox.
        "codex": tool_call("exec_command", {"cmd": "cat notes.txt"}),
        "opencode": tool_call("read", {"filePath": str(workdirs["opencode"] / "notes.txt")}),
    }


def spec(workdirs: dict[str, Path]) -> dict[str, object]:
    when: dict[str, str] = {}
    # A prompt that carries a tool's result is answered first: it also
    # still holds the question that asked for the tool.
    for name in ("claude-code", "codex", "opencode"):
        when[secret(name)] = final_answer(name)
    when["You are a title generator"] = TITLE
    for name, call in tool_calls(workdirs).items():
        when[f"TOOLTEST-{name}"] = call
    when["EDITTEST-aider"] = aider_edit("MANGO")
    return {"reply": HELLO, "when": when}


@dataclass
class Stage:
    """The server, the proxy in front of it, and a workdir per agent."""

    server: Twistd
    recorder: Recorder
    workdirs: dict[str, Path]
    tmp: Path

    @property
    def url(self) -> str:
        return self.recorder.url

    def posts_since(self, n: int) -> list[Recorded]:
        return self.recorder.posts()[n:]


@pytest.fixture(scope="session")
def agents() -> dict[str, Agent]:
    # A missing agent is installed, never skipped.
    install()
    return AGENTS


@pytest.fixture(scope="session")
def stage(tmp_path_factory: pytest.TempPathFactory, agents: dict[str, Agent]) -> Iterator[Stage]:
    tmp = tmp_path_factory.mktemp("agents")
    workdirs = {}
    for name in agents:
        workdirs[name] = tmp / f"work-{name}"
        workdirs[name].mkdir()
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec(workdirs), indent=2))
    # Claude Code's first prompt is ~50k tokens (one per character here).
    server = start_twistd(tmp, "--model", f"scripted:{spec_file}", "--ctx", "262144")
    recorder = Recorder(upstream=server.url).start()
    try:
        yield Stage(server, recorder, workdirs, tmp)
    finally:
        recorder.stop()
        stop_twistd(server)
    assert "Traceback" not in server.log_text(), server.log_text()[-5000:]
