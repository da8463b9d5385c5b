"""
The benchmark's tool-call syntax part (ds4tw.bench._parsers): a row for
every registered parser with positive figures and Hermes as the
reference, each syntax's reply read back into its own reasoning, content
and calls (and the part failing loudly when a parser's written calls do
not read back), and C{--only parsers} end to end with no model.

Caveat: these prove the part measures every syntax on a reply it reads
correctly; they do not judge the speeds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ds4tw._formats.tools.parsers import TOOL_CALL_PARSERS, HermesParser, Qwen3CoderParser
from ds4tw.bench import _parsers
from ds4tw.bench.__main__ import main, parse

ROOT = Path(__file__).resolve().parents[2]


def _claude_code_fixture(folder: Path) -> None:
    bash = {
        "type": "object",
        "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}},
        "required": ["command"],
    }
    body = {
        "model": "m",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "Bash", "input_schema": bash}],
    }
    (folder / "claude-code.json").write_text(
        json.dumps({"path": "/v1/messages?beta=true", "body": body})
    )


def _every_name_has_a_row(rows: dict[str, Any]) -> None:
    named = {name for row in rows.values() for name in row["names"]}
    assert named == set(TOOL_CALL_PARSERS)


def test_splitting_has_a_positive_row_for_every_registered_parser() -> None:
    got = _parsers.measure_splitters(repeats=1, token_s=0.02)
    rows = got["parsers"]
    _every_name_has_a_row(rows)
    assert set(rows["gpt_oss"]["names"]) == {"gpt_oss", "openai", "harmony"}
    assert rows["gpt_oss"]["reasoning_parser"] == "gpt_oss"
    assert rows["hermes"]["reasoning_parser"] == "think"
    assert rows["hermes"]["vs_hermes"] == 1.0
    for row in rows.values():
        assert row["us_per_char"] > 0 and row["vs_hermes"] > 0
        assert row["reasoning_alone_us_per_char"] > 0
        assert row["reply_chars"] > got["reasoning_chars"] > 900
        # One decoded token of 20 ms in the same run.
        assert row["share_of_token"] == pytest.approx(row["us_per_char"] / 20_000, rel=0.01)
    assert got["token_ms"] == 20.0
    assert "share of a token" in "\n".join(_parsers.table({"splitters": got}))


def test_without_a_decode_figure_there_is_no_share_of_a_token() -> None:
    got = _parsers.measure_splitters(repeats=1)
    assert got["token_ms"] is None
    assert all("share_of_token" not in row for row in got["parsers"].values())


def test_every_reply_reads_back_as_written() -> None:
    for key, (parser, _) in _parsers.distinct().items():
        r = _parsers.reply(parser)
        reasoning, content, calls = _parsers.read_back(parser, r)
        assert reasoning == _parsers.REASONING, key
        assert content.strip() == r.content.strip(), key
        assert calls == list(_parsers.CALLS), key
        # The content sentence precedes the calls, except where they must open the answer.
        assert bool(r.content) == (key != "llama3_json")
        assert parser.format_calls(_parsers.CALLS) in r.text
    harmony = _parsers.reply(TOOL_CALL_PARSERS["harmony"](""))
    assert harmony.text.startswith("<|channel|>analysis<|message|>")
    assert harmony.prompt_end == "<|start|>assistant"
    assert _parsers.reply(HermesParser()).text.startswith("<think>")


def _wrong_arguments(self: Any, calls: Sequence[tuple[str, Any]]) -> str:
    # A Hermes writer that changes an argument on the way.
    return "\n".join(
        "<tool_call>\n"
        + json.dumps({"name": n, "arguments": {**a, "timeout": 1}})
        + "\n</tool_call>"
        for n, a in calls
    )


def _no_markup(self: Any, calls: Sequence[tuple[str, Any]]) -> str:
    # Qwen3-Coder's calls without their <tool_call> tags: read back as text.
    return "\n".join(f"<function={n}>\n</function>" for n, _ in calls)


@pytest.mark.parametrize(
    ("cls", "writer", "name", "what"),
    [
        (HermesParser, _wrong_arguments, "hermes", "calls read back"),
        (Qwen3CoderParser, _no_markup, "qwen3_coder", "content read back"),
    ],
)
def test_a_reply_that_does_not_read_back_fails_the_part(
    monkeypatch: pytest.MonkeyPatch, cls: type, writer: Any, name: str, what: str
) -> None:
    monkeypatch.setattr(cls, "format_calls", writer)
    with pytest.raises(RuntimeError, match=f"^{name}: its format_calls output .*{what}"):
        _parsers.measure_splitters(repeats=1)


def test_grammar_build_has_a_positive_row_for_every_registered_parser(tmp_path: Path) -> None:
    _claude_code_fixture(tmp_path)
    got = _parsers.measure_grammars(repeats=1, folder=tmp_path)
    assert (got["agent"], got["tools"]) == ("claude-code", 1)
    rows = got["parsers"]
    _every_name_has_a_row(rows)
    assert rows["hermes"]["auto_vs_hermes"] == rows["hermes"]["required_vs_hermes"] == 1.0
    for row in rows.values():
        for mode in ("auto", "required"):
            assert row[f"{mode}_ms"] > 0 and row[f"{mode}_vs_hermes"] > 0
            assert row[f"{mode}_rules"] > 1
    assert "required ms" in "\n".join(_parsers.table({"grammars": got}))


def test_grammar_build_needs_claude_code_s_request(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no captured claude-code request"):
        _parsers.measure_grammars(repeats=1, folder=tmp_path)


def test_only_parsers_runs_both_halves_with_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert parse(["--only", "parsers"]).only == "parsers"
    # The grammar half reads Claude Code's captured request from a checkout.
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    assert main(["--only", "parsers", "--quick", "--out", str(out)]) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert doc["errors"] == [] and doc["raw"] is None
    assert any(n.startswith("--only parsers") for n in doc["notes"])
    for half in ("splitters", "grammars"):
        _every_name_has_a_row(doc["parsers"][half]["parsers"])
