#!/usr/bin/env bash
# Install ds4tw with its test extras into .venv (created if missing), then
# lint, type-check and run every test. This is the README's test command
# and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# tests/infra runs the real HAProxy and nginx (Debian's packages) in front of
# ds4tw; install them once, quietly, where we can (root with apt). Never
# started as system services: the tests run them as their own foreground
# processes on loopback ports.
if ! command -v haproxy >/dev/null || ! command -v nginx >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends haproxy nginx >/dev/null
        # The packages' postinst may start the system services; stop them.
        service nginx stop >/dev/null 2>&1 || true
        service haproxy stop >/dev/null 2>&1 || true
    else
        echo "tests/infra needs haproxy and nginx: install them (e.g. sudo apt-get install haproxy nginx)" >&2
    fi
fi
# tests/browser drives the chat page in Debian's headless Chromium through
# its chromedriver (Selenium is told where it is, so nothing is downloaded).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    else
        echo "tests/browser needs chromium and chromedriver: install them (e.g. sudo apt-get install chromium chromium-driver)" >&2
    fi
fi
# tests/agents runs the real coding agents (Claude Code, Codex, opencode from
# npm; aider from PyPI) at the releases scripts/install-agents.sh pins,
# installed outside the checkout (~/.cache/ds4tw-agents): once, quietly;
# a no-op when they are there.
if ! command -v npm >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    else
        echo "tests/agents needs node and npm: install them (e.g. sudo apt-get install nodejs npm)" >&2
    fi
fi
if command -v npm >/dev/null; then
    PYTHON="$PYTHON" bash scripts/install-agents.sh
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# twistd ds4tw --rpc and ds4tw-rpc-worker need llama.cpp's RPC backend:
# llama-cpp-python built with -DGGML_RPC=ON, from a wheel cached outside
# the checkout (built once, several minutes); a no-op when installed. The
# install below then keeps it (it satisfies ds4tw's requirement).
bash scripts/install-llama.sh .venv/bin/python
# The rest by uv, into the same venv: from its cache (outside the checkout)
# a new venv is ready in seconds, where pip took 45 s (scripts/ci time).
# compat mode: a regular editable install hides twisted/plugins/ds4tw_plugin.py
# from twistd's plugin discovery. uv keeps the llama-cpp-python installed
# above: it satisfies ds4tw's requirement.
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q --no-compile uv
.venv/bin/uv pip install -q --python .venv/bin/python -e '.[test]' -C editable_mode=compat
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Arguments that name tests (a path, a node id, an option's value) run as
# they are, in one pytest. Otherwise the unit tests (tests/unit: no reactor,
# no sockets, no sleeps, time from a Clock) run on every core with
# pytest-xdist, then the rest one at a time: their real-time tests measure
# gaps and cancels, and a busy neighbour would only blur them.
for arg in "$@"; do
    case $arg in
        -*) ;;
        *) exec .venv/bin/python -m pytest "$@" ;;
    esac
done
status=0
.venv/bin/python -m pytest -n auto tests/unit "$@" || status=$?
.venv/bin/python -m pytest --ignore=tests/unit "$@" || status=$((status ? status : $?))
exit "$status"
