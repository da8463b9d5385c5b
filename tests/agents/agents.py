"""
The four coding agents as a user runs them against ds4tw, headless: where
scripts/install-agents.sh put them, the configuration each gets (in a HOME
of its own, so that nothing leaks between runs or from the machine), and
how to run one with a bounded time. Shared by the tests and by
scripts/refresh-agent-fixtures.py; docs/agents.md shows the same settings
for users.

Every agent gets a minimal environment (nothing inherited: no real API
keys, proxies or XDG directories from the machine), telemetry, error
reporting and update checks off, and the server's URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import psutil

__all__ = ["AGENTS", "Agent", "Run", "install", "run_agent"]

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install-agents.sh"

#: The key every agent sends; ds4tw runs without --api-key, so any will do.
API_KEY = "ds4tw-test-key"
#: The model name every agent asks for (ds4tw serves one model, any name).
MODEL = "scripted"
#: Set, to a value of its own, in the environment of each run.
RUN_MARKER = "DS4TW_AGENT_RUN"


@cache
def install() -> dict[str, str]:
    """Install the pinned agents if absent; their executables and versions."""
    done = subprocess.run(["bash", str(INSTALL), "--paths"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"scripts/install-agents.sh failed ({done.returncode}); it needs node, npm and "
            f"access to the npm registry and PyPI:\n{done.stderr[-4000:]}"
        )
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


@dataclass(frozen=True)
class Run:
    """One finished run of an agent."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    def describe(self) -> str:
        return (
            f"{self.argv[0]} exited {self.returncode} after {self.seconds:.1f}s"
            f"{' (timed out, killed)' if self.timed_out else ''}\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"
        )


@dataclass(frozen=True)
class Agent:
    """
    One agent: C{configure(home, base_url)} writes its configuration into
    a fresh HOME and returns its environment; C{argv(prompt, files)} is the
    headless command line.
    """

    name: str
    #: The route it posts conversations to.
    route: str
    configure: Callable[[Path, str], dict[str, str]]
    argv: Callable[[str, list[str]], list[str]]
    #: How the agent is started, for docs and the fixture's provenance.
    command: str
    #: The header carrying its session id, which ds4tw takes as the session key.
    session_header: str | None = None
    #: Files it may read in a tool round trip are given on its command line.
    files_on_command_line: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return install()[f"{self.name}_version"]

    @property
    def executable(self) -> str:
        return install()[self.name]


def _base_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {
        # Node for the npm launchers; nothing from the machine's own PATH
        # that could shadow an agent's helpers.
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }


# -- Claude Code ---------------------------------------------------------------


def _claude_env(home: Path, base_url: str) -> dict[str, str]:
    return {
        **_base_env(home),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": API_KEY,
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        # One switch for telemetry, error reporting, the update check and
        # the other calls home; the rest say the same one by one.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_BUG_COMMAND": "1",
    }


CLAUDE = Agent(
    name="claude-code",
    route="/v1/messages",
    configure=_claude_env,
    argv=lambda prompt, files: [install()["claude-code"], "-p", prompt],
    command="claude -p PROMPT",
    session_header="X-Claude-Code-Session-Id",
)


# -- Codex -----------------------------------------------------------------------


def _codex_env(home: Path, base_url: str) -> dict[str, str]:
    env = _base_env(home)
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(codex_config(base_url))
    return {**env, "CODEX_HOME": str(codex_home), "DS4TW_API_KEY": API_KEY}


def codex_config(base_url: str) -> str:
    """$CODEX_HOME/config.toml: ds4tw as a Responses provider, nothing sent home."""
    return f"""\
model = "{MODEL}"
model_provider = "ds4tw"
check_for_update_on_startup = false

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"

# Both sync a plugin marketplace from github.com and chatgpt.com at start.
[features]
plugins = false
remote_plugin = false

[model_providers.ds4tw]
name = "ds4tw"
base_url = "{base_url}/v1"
wire_api = "responses"
env_key = "DS4TW_API_KEY"
"""


CODEX = Agent(
    name="codex",
    route="/v1/responses",
    configure=_codex_env,
    argv=lambda prompt, files: [
        install()["codex"],
        "exec",
        "--skip-git-repo-check",
        "--color",
        "never",
        prompt,
    ],
    command="codex exec --skip-git-repo-check PROMPT",
    session_header="session-id",
)


# -- opencode --------------------------------------------------------------------


def opencode_config(base_url: str) -> dict[str, object]:
    """opencode.json: ds4tw as an OpenAI-compatible provider."""
    return {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "ds4tw": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "ds4tw",
                "options": {"baseURL": f"{base_url}/v1", "apiKey": API_KEY},
                "models": {MODEL: {"name": MODEL}},
            }
        },
        "model": f"ds4tw/{MODEL}",
        "autoupdate": False,
        "share": "disabled",
    }


def _opencode_env(home: Path, base_url: str) -> dict[str, str]:
    env = _base_env(home)
    config_dir = home / ".config" / "opencode"
    config_dir.parent.mkdir(parents=True, exist_ok=True)
    # The plugin SDK opencode would npm-install here at startup, pre-installed
    # (scripts/install-agents.sh): no registry traffic during a run.
    subprocess.run(
        ["cp", "-a", install()["opencode_config"], str(config_dir)],
        check=True,
    )
    config = home / "opencode.json"
    config.write_text(json.dumps(opencode_config(base_url), indent=2))
    return {
        **env,
        "OPENCODE_CONFIG": str(config),
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        "OPENCODE_DISABLE_SHARE": "1",
        # Should anything still reach for npm, it fails at once instead of
        # reaching the registry.
        "npm_config_registry": "http://127.0.0.1:9/",
        "npm_config_offline": "true",
    }


OPENCODE = Agent(
    name="opencode",
    route="/v1/chat/completions",
    configure=_opencode_env,
    argv=lambda prompt, files: [install()["opencode"], "run", prompt],
    command="opencode run PROMPT",
    session_header="x-session-affinity",
)


# -- aider -----------------------------------------------------------------------


def _aider_env(home: Path, base_url: str) -> dict[str, str]:
    # aider fetches litellm's model list from GitHub unless its cache of it
    # is under a day old and not empty: seeded with the copy litellm ships.
    venv = Path(install()["aider"]).parent.parent
    (shipped,) = venv.glob(
        "lib/python3*/site-packages/litellm/model_prices_and_context_window_backup.json"
    )
    cache = home / ".aider" / "caches" / "model_prices_and_context_window.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped, cache)
    return {
        **_base_env(home),
        "OPENAI_API_BASE": f"{base_url}/v1",
        "OPENAI_API_KEY": API_KEY,
        # litellm fetches a model price list from GitHub at import otherwise.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }


AIDER = Agent(
    name="aider",
    route="/v1/chat/completions",
    configure=_aider_env,
    argv=lambda prompt, files: [
        install()["aider"],
        "--model",
        f"openai/{MODEL}",
        "--edit-format",
        "diff",
        "--no-git",
        "--yes-always",
        "--no-check-update",
        "--analytics-disable",
        "--no-show-model-warnings",
        "--no-show-release-notes",
        "--no-pretty",
        "--no-fancy-input",
        "--message",
        prompt,
        *files,
    ],
    command=(
        "aider --model openai/MODEL --edit-format diff --no-git --yes-always "
        "--no-check-update --analytics-disable --message PROMPT FILE"
    ),
    files_on_command_line=True,
)

AGENTS = {a.name: a for a in (CLAUDE, CODEX, OPENCODE, AIDER)}


def run_agent(
    agent: Agent,
    prompt: str,
    base_url: str,
    home: Path,
    workdir: Path,
    files: Sequence[str] = (),
    timeout: float = 120,
) -> Run:
    """
    Run C{agent} headless on C{prompt} in C{workdir}, with a fresh
    configuration in C{home}. When it returns or times out, every process
    it started is killed: its process group, and anything that left the
    group (a command in a PTY of its own), found by a marker in its
    environment that only this run's processes carry.
    """
    marker = uuid.uuid4().hex
    env = {**agent.configure(home, base_url), RUN_MARKER: marker}
    argv = agent.argv(prompt, list(files))
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
    finally:
        _kill_group(proc.pid)
        _kill_marked(marker)
    return Run(argv, proc.returncode, stdout, stderr, time.monotonic() - t0, timed_out)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_marked(marker: str) -> None:
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if p.environ().get(RUN_MARKER) == marker:
                p.kill()
