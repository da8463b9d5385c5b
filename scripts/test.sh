#!/usr/bin/env bash
# Install ds4tw with its test extras into .venv (created if missing), then
# lint, type-check and run every test. This is the README's test command
# and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# compat mode: a regular editable install hides twisted/plugins/ds4tw_plugin.py
# from twistd's plugin discovery.
.venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
