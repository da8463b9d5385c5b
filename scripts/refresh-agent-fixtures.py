"""
Capture each coding agent's first request to ds4tw and check it in as
tests/agents/fixtures/AGENT.json: the method, path, headers and body
exactly as sent (tools untouched), beside where it came from (agent,
release, date, command, prompt) and every request of the run. For
opencode, which sends a title request first, the first one with tools.

    .venv/bin/python scripts/refresh-agent-fixtures.py [AGENT ...]

Each agent runs once, headless, as tests/agents runs it (tests/agents/
agents.py: a fresh HOME, telemetry and updates off) on one plain prompt,
against twistd on the scripted engine behind a recording proxy. The
release is the one scripts/install-agents.sh pins; to capture a newer one,
name it in the environment (CLAUDE_CODE_VERSION, CODEX_VERSION,
OPENCODE_VERSION, AIDER_VERSION) and bump the pin once the tests pass.

Runs happen in fixed directories (/tmp/ds4tw-agent-capture), so that the
paths the agents put in their prompts are the same from one capture to
the next.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.agents.agents import AGENTS, Agent, run_agent  # noqa: E402
from tests.agents.recorder import Recorded, Recorder  # noqa: E402
from tests.integration.conftest import start_twistd, stop_twistd  # noqa: E402

FIXTURES = ROOT / "tests" / "agents" / "fixtures"
BASE = Path("/tmp/ds4tw-agent-capture")
PROMPT = "Say hello."
SPEC = {
    "reply": "Hello from ds4tw.",
    "when": {"You are a title generator": "Hello"},
}


def first_request(posts: list[Recorded]) -> Recorded:
    """The first request that carries the conversation: with the tools, if any."""
    with_tools = [p for p in posts if p.body and "tools" in p.json()]
    return (with_tools or posts)[0]


def capture(agent: Agent, url: str) -> dict[str, object]:
    home, work = BASE / f"home-{agent.name}", BASE / "work"
    shutil.rmtree(home, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(upstream=url).start()
    try:
        run = run_agent(agent, PROMPT, recorder.url, home, work, timeout=180)
    finally:
        recorder.stop()
    posts = recorder.posts()
    if not posts:
        raise SystemExit(f"{agent.name} sent no request:\n{run.describe()}")
    req = first_request(posts)
    return {
        "agent": agent.name,
        "version": agent.version,
        "captured": datetime.date.today().isoformat(),
        "command": agent.command,
        "prompt": PROMPT,
        "exit": run.returncode,
        "requests": [f"{r.method} {r.path} {r.status}" for r in recorder.requests],
        # The captured request itself, as sent.
        "method": req.method,
        "path": req.path,
        "headers": [list(h) for h in req.headers],
        "body": req.json(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("agents", nargs="*", help=f"default: all of {', '.join(AGENTS)}")
    names = parser.parse_args().agents or list(AGENTS)
    unknown = set(names) - set(AGENTS)
    if unknown:
        parser.error(f"unknown agent {sorted(unknown)[0]!r}; known: {', '.join(AGENTS)}")
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.mkdir(parents=True)
    (BASE / "spec.json").write_text(json.dumps(SPEC))
    server = start_twistd(BASE, "--model", f"scripted:{BASE / 'spec.json'}", "--ctx", "262144")
    try:
        for name in names:
            fixture = capture(AGENTS[name], server.url)
            out = FIXTURES / f"{name}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
            print(f"{out.relative_to(ROOT)}: {name} {fixture['version']}, {fixture['requests']}")
    finally:
        stop_twistd(server)


if __name__ == "__main__":
    main()
