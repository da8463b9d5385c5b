"""
What each registered tool-call syntax costs ds4tw (no model), in this
process and on this machine, every figure also a ratio against the
Hermes parser measured in the same run (the machines are shared and
noisy; best of N repetitions, the parsers interleaved in each, in this
thread's CPU time):

  - splitting: the reasoning splitter and the tool-call splitter chained
    as the output pipeline chains them (L{ds4tw._formats.pipeline}), fed a reply
    one character at a time, in microseconds per character. The reply is
    built from the parser's own C{format_calls} (two parallel calls to
    Claude Code-like C{Bash} and C{Edit} tools) after ~1,000 characters
    of reasoning in the family's reasoning syntax (C{<think>} tags, or
    harmony's analysis channel for gpt-oss) and a sentence of content.
    Before it is timed, each reply must split back into its own
    reasoning, content and calls: a syntax whose written calls its
    splitter does not read back fails the part. With a decode figure
    from the same run, the cost of a character is also given as a share
    of one decoded token's time;
  - grammar build: C{parser.grammar(tooling)} for Claude Code's captured
    tool list (L{ds4tw.bench._grammars}; from a checkout), with
    C{tool_choice} auto (lazy) and required (forced), uncached, in
    milliseconds.

The per-character figure leaves out what every syntax pays alike (UTF-8
assembly and stop sequences, logprobs); the reasoning splitter alone is
measured too, so that what the tool-call splitter adds can be read off.

Covered by tests/unit/test_bench_parsers.py.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .._formats.reasoning import ReasoningSplitter, TagReasoningParser, reasoning_parser
from .._formats.tools.parsers import TOOL_CALL_PARSERS, ToolCallParser
from .._formats.tools.parsers.base import ToolCallSplitter
from .._formats.tools.spec import ToolChoice, Tooling, ToolSpec
from .._types import ContentText, ReasoningText, ToolCallEnd, ToolCallStart
from ._grammars import FIXTURES, agent_requests, request_tooling

#: The ratios' reference syntax.
REFERENCE = "hermes"

#: The agent whose tool list the grammars are built for.
AGENT = "claude-code"

#: Reasoning syntax by tool-call parser name; the rest think in tags.
_REASONING = {"gpt_oss": "gpt_oss"}

#: Syntaxes whose calls must open the answer (no content before them).
_CALLS_OPEN_THE_ANSWER = frozenset({"llama3_json"})

_HARMONY_PROMPT_END = "<|start|>assistant"

#: This thread's CPU time, not the wall clock: on the shared cores another
#: process's time slice lands inside a run (measured: a 3 ms feed took
#: 7 ms of wall time every other run, with one involuntary context switch,
#: and the same 3 ms of CPU), and the parsers pay only their own.
_clock = time.thread_time

#: ~1,000 characters of the reasoning an agent's model writes before a
#: call, with the C{<} and quotes that make splitters hold text back.
REASONING = (
    "The test fails because parse_range() returns an empty list when the upper "
    "bound equals the lower bound: the loop runs while i < hi, so for lo == hi "
    'nothing is appended. The docstring says "inclusive on both ends", and the '
    "callers in report.py rely on that (they pass the same day twice for a single "
    "day). So the fix belongs in parse_range, not in the callers. I should change "
    "the condition to i <= hi and check that nothing depends on the exclusive "
    "behaviour. grep for parse_range: it is used in report.py, in export.py and in "
    "the tests. export.py builds a range with hi = len(rows), which would now read "
    "one past the end, so it has to pass len(rows) - 1 instead. Let me first run "
    "the failing test alone to see the exact assertion, then edit both places. "
    "The test file uses pytest's -k filter well, so `pytest -q -k range` is enough. "
    "After the edit I will run the whole module to make sure the <= change did not "
    "break the empty-range case (lo > hi must still give []), which test_empty "
    "covers. Nothing else calls it with lo > hi, per the grep."
)

#: The sentence the model says before calling.
CONTENT = "I'll run the failing test, then fix the bound in parse_range."

_BASH = ToolSpec(
    "Bash",
    "Executes a given bash command.",
    {
        "type": "object",
        "properties": {
            "command": {"type": "string", "description": "The command to execute"},
            "timeout": {"type": "number", "description": "Optional timeout in milliseconds"},
            "description": {"type": "string", "description": "What this command does"},
            "run_in_background": {"type": "boolean"},
        },
        "required": ["command"],
        "additionalProperties": False,
    },
)
_EDIT = ToolSpec(
    "Edit",
    "Performs exact string replacements in files.",
    {
        "type": "object",
        "properties": {
            "file_path": {"type": "string"},
            "old_string": {"type": "string"},
            "new_string": {"type": "string"},
            "replace_all": {"type": "boolean", "default": False},
        },
        "required": ["file_path", "old_string", "new_string"],
        "additionalProperties": False,
    },
)
#: The splitting part's tools: Claude Code's two busiest, their schemas
#: trimmed of prose (a splitter reads the types, not the descriptions).
TOOLING = Tooling((_BASH, _EDIT))

#: Two parallel calls with typed values, a newline, quotes and C{<}.
CALLS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "Bash",
        {
            "command": 'cd /repo && python -m pytest -q -k "range and not slow" tests/test_days.py',
            "description": "Run the date range tests",
            "timeout": 120000,
        },
    ),
    (
        "Edit",
        {
            "file_path": "/repo/dates.py",
            "old_string": "    while i < hi:\n        out.append(i)",
            "new_string": "    while i <= hi:\n        out.append(i)",
            "replace_all": False,
        },
    ),
)


@dataclass(frozen=True)
class Reply:
    """One syntax's reply, and what its splitters must read back from it."""

    text: str
    reasoning_parser: str
    #: The rendered prompt's end, from which the reasoning splitter starts.
    prompt_end: str
    reasoning: str
    content: str
    calls: tuple[tuple[str, Any], ...]


def reply(parser: ToolCallParser) -> Reply:
    """The reply a model of C{parser}'s family writes: reasoning, a sentence, two calls."""
    name = _REASONING.get(parser.name, "think")
    content = "" if parser.name in _CALLS_OPEN_THE_ANSWER else CONTENT
    calls = parser.format_calls(CALLS)
    rp = reasoning_parser(name)
    if isinstance(rp, TagReasoningParser):
        # The generation prompt does not open the block: the model does.
        answer = f"{content}\n\n" if content else ""
        text = f"{rp.start}{REASONING}{rp.end}\n\n{answer}{calls}"
        prompt_end = ""
    else:
        # Harmony: the prompt ends with the role; the analysis message,
        # then a commentary preamble the user sees, then the call messages.
        start = _HARMONY_PROMPT_END
        text = (
            f"<|channel|>analysis<|message|>{REASONING}<|end|>{start}"
            f"<|channel|>commentary<|message|>{content}<|end|>{start}{calls}"
        )
        prompt_end = start
    return Reply(text, name, prompt_end, REASONING, content, CALLS)


def _splitters(parser: ToolCallParser, r: Reply) -> tuple[ReasoningSplitter, ToolCallSplitter]:
    return reasoning_parser(r.reasoning_parser).splitter(r.prompt_end), parser.splitter(TOOLING)


def read_back(parser: ToolCallParser, r: Reply) -> tuple[str, str, list[tuple[str, Any]]]:
    """C{(reasoning, content, calls)} as the chained splitters read C{r} one character at a time."""
    thinking, tools = _splitters(parser, r)
    reasoning: list[str] = []
    content: list[str] = []
    names: dict[int, str] = {}
    calls: list[tuple[str, Any]] = []

    def route(parts: Sequence[object]) -> None:
        for part in parts:
            if isinstance(part, ReasoningText):
                reasoning.append(part.text)
            elif isinstance(part, ContentText):
                events(tools.feed(part.text))

    def events(parts: Sequence[object]) -> None:
        for event in parts:
            if isinstance(event, ContentText):
                content.append(event.text)
            elif isinstance(event, ToolCallStart):
                names[event.index] = event.name
            elif isinstance(event, ToolCallEnd):
                calls.append((names[event.index], json.loads(event.arguments)))

    for ch in r.text:
        route(thinking.feed(ch))
    route(thinking.flush())
    events(tools.flush())
    return "".join(reasoning), "".join(content), calls


def check(parser: ToolCallParser, r: Reply) -> None:
    """
    Fail unless C{r} splits back into its own reasoning, content and
    calls: a benchmark of a reply its parser misreads measures nothing.
    """
    try:
        reasoning, content, calls = read_back(parser, r)
    except ValueError as e:
        raise RuntimeError(
            f"{parser.name}: its format_calls output does not split back through its own "
            f"splitter (arguments that are not JSON: {e})"
        ) from e
    problems = []
    if reasoning.strip() != r.reasoning.strip():
        problems.append(f"reasoning read back as {reasoning[:80]!r}...")
    if content.strip() != r.content.strip():
        problems.append(f"content read back as {content!r}")
    if calls != list(r.calls):
        problems.append(f"calls read back as {calls!r}")
    if problems:
        raise RuntimeError(
            f"{parser.name}: its format_calls output does not split back through its own "
            f"splitter ({'; '.join(problems)}); reply was {r.text[-300:]!r}"
        )


def _feed_seconds(parser: ToolCallParser, r: Reply, tool_calls: bool = True) -> float:
    """One timed pass of the reply through the splitters, as the output pipeline routes it."""
    thinking, tools = _splitters(parser, r)
    text = r.text
    t0 = _clock()
    for ch in text:
        for part in thinking.feed(ch):
            if tool_calls and isinstance(part, ContentText):
                tools.feed(part.text)
    thinking.flush()
    if tool_calls:
        tools.flush()
    return _clock() - t0


def distinct(
    registry: Mapping[str, Callable[[str], ToolCallParser]] | None = None,
) -> dict[str, tuple[ToolCallParser, list[str]]]:
    """Each registered syntax once (aliases share a parser) by its key, with its names."""
    out: dict[str, tuple[ToolCallParser, list[str]]] = {}
    for name, factory in (TOOL_CALL_PARSERS if registry is None else registry).items():
        parser = factory("")
        if parser.key not in out:
            out[parser.key] = (parser, [])
        out[parser.key][1].append(name)
    if REFERENCE not in out:
        raise RuntimeError(f"the reference parser {REFERENCE!r} is not registered")
    return out


def _orders(keys: list[str], n: int) -> list[list[str]]:
    """
    The keys in a new order for each of C{n} repetitions. Interleaved, so
    that a noisy moment hits every syntax alike; shuffled, because on a
    shared machine the slow moments can be periodic (measured: a feed ran
    at full speed or at half, alternately) and a fixed order can put one
    syntax in the slow phase every time.
    """
    rng = random.Random(0)
    return [rng.sample(keys, len(keys)) for _ in range(n)]


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else float("nan")


def measure_splitters(
    quick: bool = False,
    repeats: int | None = None,
    token_s: float | None = None,
) -> dict[str, Any]:
    """
    Microseconds per character of each syntax's reply through the chained
    splitters, best of C{repeats}; with C{token_s} (one decoded token's
    time in the same run) each also as a share of it.
    """
    n = repeats if repeats is not None else (5 if quick else 21)
    parsers = distinct()
    replies = {key: reply(parser) for key, (parser, _) in parsers.items()}
    for key, (parser, _) in parsers.items():
        check(parser, replies[key])
    best: dict[str, float] = dict.fromkeys(parsers, float("inf"))
    # The reasoning splitter alone on the same reply: what the family pays
    # before its tool-call splitter sees a character.
    alone: dict[str, float] = dict.fromkeys(parsers, float("inf"))
    for order in _orders(list(parsers), n):
        for key in order:
            parser, r = parsers[key][0], replies[key]
            best[key] = min(best[key], _feed_seconds(parser, r))
            alone[key] = min(alone[key], _feed_seconds(parser, r, tool_calls=False))
    ref = best[REFERENCE] / len(replies[REFERENCE].text)
    rows: dict[str, Any] = {}
    for key, (parser, names) in parsers.items():
        r = replies[key]
        us = best[key] / len(r.text) * 1e6
        row: dict[str, Any] = {
            "names": names,
            "reasoning_parser": r.reasoning_parser,
            "reply_chars": len(r.text),
            "calls_chars": len(parser.format_calls(CALLS)),
            "us_per_char": round(us, 4),
            "vs_hermes": _ratio(us, ref * 1e6),
            "reasoning_alone_us_per_char": round(alone[key] / len(r.text) * 1e6, 4),
        }
        if token_s:
            row["share_of_token"] = round(us / (token_s * 1e6), 6)
        rows[key] = row
    return {
        "repeats": n,
        "reference": REFERENCE,
        "token_ms": round(token_s * 1e3, 3) if token_s else None,
        "calls": len(CALLS),
        "reasoning_chars": len(REASONING),
        "parsers": rows,
    }


def measure_grammars(
    quick: bool = False, repeats: int | None = None, folder: Path = FIXTURES
) -> dict[str, Any]:
    """
    Milliseconds to build each syntax's grammar for Claude Code's captured
    tool list, lazy (C{auto}) and forced (C{required}), uncached, best of
    C{repeats}.
    """
    n = repeats if repeats is not None else (3 if quick else 9)
    found = {agent: (route, body) for agent, route, body in agent_requests(folder)}
    if AGENT not in found:
        raise RuntimeError(f"no captured {AGENT} request with tools in {folder} (from a checkout)")
    tooling, _ = request_tooling(*found[AGENT])
    modes = {
        "auto": replace(tooling, choice=ToolChoice("auto")),
        "required": replace(tooling, choice=ToolChoice("required")),
    }
    parsers = distinct()
    best = {(key, mode): float("inf") for key in parsers for mode in modes}
    rules: dict[tuple[str, str], int] = {}
    for order in _orders(list(parsers), n):
        for key in order:
            parser = parsers[key][0]
            for mode, t in modes.items():
                t0 = _clock()
                grammar = parser.grammar(t)
                best[key, mode] = min(best[key, mode], _clock() - t0)
                rules[key, mode] = grammar.gbnf.count("\n") + 1
    rows: dict[str, Any] = {}
    for key, (_parser, names) in parsers.items():
        row: dict[str, Any] = {"names": names}
        for mode in modes:
            ms = best[key, mode] * 1e3
            row[f"{mode}_ms"] = round(ms, 3)
            row[f"{mode}_vs_hermes"] = _ratio(ms, best[REFERENCE, mode] * 1e3)
            row[f"{mode}_rules"] = rules[key, mode]
        rows[key] = row
    return {
        "repeats": n,
        "reference": REFERENCE,
        "agent": AGENT,
        "tools": len(tooling.tools),
        "parsers": rows,
    }


def table(section: Mapping[str, Any]) -> list[str]:
    """The part's lines for the console, one row per syntax."""
    lines: list[str] = []
    split = section.get("splitters")
    grammars = section.get("grammars")
    if split:
        token = split.get("token_ms")
        lines.append(
            f"tool-call parsing, best of {split['repeats']}, per character of a reply "
            f"(~{split['reasoning_chars']} chars of reasoning, {split['calls']} calls)"
            + (f"; one decoded token = {token} ms" if token else "")
        )
        lines.append(
            f"  {'parser':<14}{'chars':>6}{'us/char':>10}{'vs hermes':>11}{'reasoning alone':>17}"
            + ("  share of a token" if token else "")
        )
        for key, row in split["parsers"].items():
            line = (
                f"  {key:<14}{row['reply_chars']:>6}{row['us_per_char']:>10.2f}"
                f"{row['vs_hermes']:>11.2f}{row['reasoning_alone_us_per_char']:>17.2f}"
            )
            if token:
                line += f"  {row['share_of_token']:>17.5f}"
            lines.append(line)
    if grammars:
        lines.append(
            f"grammar build, {grammars['agent']}'s {grammars['tools']} tools, uncached, "
            f"best of {grammars['repeats']}"
        )
        lines.append(
            f"  {'parser':<14}{'auto ms':>9}{'vs hermes':>11}{'required ms':>13}{'vs hermes':>11}"
        )
        for key, row in grammars["parsers"].items():
            lines.append(
                f"  {key:<14}{row['auto_ms']:>9.2f}{row['auto_vs_hermes']:>11.2f}"
                f"{row['required_ms']:>13.2f}{row['required_vs_hermes']:>11.2f}"
            )
    return lines
