#!/usr/bin/env bash
# Install the coding agents tests/agents runs against ds4tw, at pinned
# releases, outside the checkout: Claude Code, Codex and opencode from npm
# (their Linux binaries come inside npm packages), aider from PyPI in a venv
# of its own (its pins clash with ours); and the client library tests/clients
# drives, ollama-js (npm `ollama`). One directory per agent and
# version under $DS4TW_AGENTS_DIR, so a new pin installs beside the old one
# and an installed pin costs nothing. Quiet; idempotent.
#
#   scripts/install-agents.sh           install what is missing
#   scripts/install-agents.sh --paths   the same, then print NAME=EXECUTABLE
#
# Bump a pin here, then refresh the captured requests:
# .venv/bin/python scripts/refresh-agent-fixtures.py (docs/agents.md).
set -euo pipefail

# The pins; the environment may name other releases (to try a newer one).
CLAUDE_CODE_VERSION=${CLAUDE_CODE_VERSION:-2.1.332}
CODEX_VERSION=${CODEX_VERSION:-0.171.0}
OPENCODE_VERSION=${OPENCODE_VERSION:-1.18.33}
AIDER_VERSION=${AIDER_VERSION:-0.86.2}
OLLAMA_JS_VERSION=${OLLAMA_JS_VERSION:-0.6.4}

DIR=${DS4TW_AGENTS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ds4tw-agents}
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR"

# A directory counts as installed once its marker is written, last; a
# half-finished install (a killed run) is removed and done again.
installed() { [ -e "$1/.installed" ]; }

# Run quietly; on failure show what the command said.
quiet() {
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "install-agents.sh: failed: $*" >&2
        return 1
    fi
    rm -f "$log"
}

npm_install() {  # DIR PACKAGE@VERSION...
    local dest=$1
    shift
    rm -rf "$dest"
    mkdir -p "$dest"
    quiet npm install --prefix "$dest" --save-exact --no-audit --no-fund --no-update-notifier \
        --loglevel=error "$@"
}

claude=$DIR/claude-code-$CLAUDE_CODE_VERSION
if ! installed "$claude"; then
    npm_install "$claude" "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION"
    touch "$claude/.installed"
fi

codex=$DIR/codex-$CODEX_VERSION
if ! installed "$codex"; then
    npm_install "$codex" "@openai/codex@$CODEX_VERSION"
    touch "$codex/.installed"
fi

# opencode bundles its provider packages (@ai-sdk/openai-compatible among
# them) but at startup npm-installs @opencode-ai/plugin, at its own version,
# into each config directory (~/.config/opencode). Installed here once as
# that directory's template, which the tests copy into each run's HOME, so
# runs touch no registry.
opencode=$DIR/opencode-$OPENCODE_VERSION
if ! installed "$opencode"; then
    npm_install "$opencode" "opencode-ai@$OPENCODE_VERSION"
    npm_install "$opencode/config-opencode" "@opencode-ai/plugin@$OPENCODE_VERSION"
    touch "$opencode/.installed"
fi

aider=$DIR/aider-$AIDER_VERSION
if ! installed "$aider"; then
    rm -rf "$aider"
    quiet "$PYTHON" -m venv "$aider"
    quiet "$aider/bin/python" -m pip install --disable-pip-version-check \
        "aider-chat==$AIDER_VERSION"
    touch "$aider/.installed"
fi

ollama_js=$DIR/ollama-js-$OLLAMA_JS_VERSION
if ! installed "$ollama_js"; then
    npm_install "$ollama_js" "ollama@$OLLAMA_JS_VERSION"
    touch "$ollama_js/.installed"
fi

if [ "${1:-}" = --paths ]; then
    echo "claude-code=$claude/node_modules/.bin/claude"
    echo "codex=$codex/node_modules/.bin/codex"
    echo "opencode=$opencode/node_modules/.bin/opencode"
    echo "opencode_config=$opencode/config-opencode"
    echo "aider=$aider/bin/aider"
    echo "ollama-js=$ollama_js"
    echo "claude-code_version=$CLAUDE_CODE_VERSION"
    echo "codex_version=$CODEX_VERSION"
    echo "opencode_version=$OPENCODE_VERSION"
    echo "aider_version=$AIDER_VERSION"
    echo "ollama-js_version=$OLLAMA_JS_VERSION"
fi
