"""The billing-header normalisation, alone and through /v1/messages and chat completions."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from ds4tw._formats import normalise as _normalise
from ds4tw._formats.normalise import normalise

LINE = "x-anthropic-billing-header: cc_version=2.1.117.48f; cc_entrypoint=cli; cch=71fea;"
OTHER = "x-anthropic-billing-header: cc_version=2.1.118.9a0; cc_entrypoint=cli; cch=0aaa9;"
SYSTEM = "You are Claude Code, Anthropic's official CLI for Claude."


def test_a_leading_line_is_removed_from_a_system_string() -> None:
    a = normalise([{"role": "system", "content": f"{LINE}\n\n{SYSTEM}"}])
    b = normalise([{"role": "system", "content": f"{OTHER}\n{SYSTEM}"}])
    assert a == b == [{"role": "system", "content": SYSTEM}]


def test_a_whole_block_is_dropped_from_system_parts() -> None:
    parts = [{"type": "text", "text": LINE}, {"type": "text", "text": SYSTEM}]
    assert normalise([{"role": "system", "content": parts}]) == [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]}
    ]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": f"{LINE}\n{SYSTEM}"}],
        [{"role": "system", "content": f"{SYSTEM}\n{LINE}"}],
        [{"role": "system", "content": "x-anthropic-billing-header is a header name"}],
        [{"role": "system", "content": SYSTEM}, {"role": "system", "content": LINE}],
    ],
)
def test_nothing_else_is_touched(messages: list[dict[str, Any]]) -> None:
    assert normalise(messages) == messages


def test_logged_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_normalise, "_logged", set())
    seen: list[LogEvent] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for line in (LINE, OTHER, LINE):
            normalise([{"role": "system", "content": f"{line}\n{SYSTEM}"}])
    finally:
        globalLogPublisher.removeObserver(seen.append)
    said = [formatEvent(e) for e in seen if "billing-header" in formatEvent(e)]
    assert len(said) == 1 and "once" in said[0]
