"""
Prompt normalisations: request content that changes on every request but
means nothing to the model, removed before templating so that it does not
defeat the prompt cache (a prefix differing at token 40 shares 40 tokens).

  - Claude Code (2.1.x) starts its system prompt with a line
    C{x-anthropic-billing-header: cc_version=2.1.117.48f;
    cc_entrypoint=cli; cch=71fea;} whose values are recomputed for every
    request (llama.cpp#19494, ollama#14918). It is removed: a whole system
    text block that is only that line, or that line at the start of a
    system message's text. Nothing else of the system prompt changes, and
    user and assistant messages are never touched.

Each normalisation is logged once per process, the first time it applies.
docs/cache.md lists them.

Covered by tests/unit/test_normalise.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.logger import Logger

log = Logger()

_BILLING = re.compile(r"\A[ \t\r\n]*x-anthropic-billing-header:[^\n]*(?:\n|\Z)")
_SYSTEM_ROLES = ("system", "developer")
_logged: set[str] = set()


def _strip(text: str) -> str | None:
    """C{text} without the billing line, or None when it has none."""
    m = _BILLING.match(text)
    # Anthropic system blocks are joined with blank lines: drop those too.
    return None if m is None else text[m.end() :].lstrip("\r\n")


def _system(content: Any) -> Any:
    if isinstance(content, str):
        stripped = _strip(content)
        return content if stripped is None else stripped
    if isinstance(content, list):
        out: list[Any] = []
        changed = False
        for i, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) else None
            stripped = _strip(text) if isinstance(text, str) and (i == 0 or changed) else None
            if stripped is None:
                out.append(part)
                continue
            changed = True
            if stripped.strip():
                out.append({**part, "text": stripped})
        return out if changed else content
    return content


def normalise(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """C{messages} (Hugging Face chat messages) with per-request noise removed."""
    out = list(messages)
    for i, m in enumerate(out):
        if m.get("role") not in _SYSTEM_ROLES:
            continue
        content = _system(m.get("content"))
        if content is not m.get("content"):
            out[i] = {**m, "content": content}
            _once(
                "billing-header",
                "ds4tw: removed Claude Code's per-request x-anthropic-billing-header line from "
                "the system prompt, so that the prompt cache can reuse it (logged once)",
            )
        break  # only the first system message carries it
    return out


def _once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(message)
