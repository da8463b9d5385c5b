"""
Grammar build time for the tool lists real agents send, from
their captured first requests (tests/agents/fixtures: Claude Code on
C{/v1/messages}, Codex on C{/v1/responses}, opencode on chat
completions; aider sends no tools).

For each request, in this process and on this machine, medians of
repeated trials:

  - the baseline: what every such request costs before it is queued
    anyway, without a grammar: validating the body into the dialect's
    request (tools and their schemas checked) and rendering it with a
    ChatML chat template (the scripted engine's, so no model is needed);
  - cold: building the tool-call grammar of the whole tool list
    (L{ds4tw._formats.tools.parsers.HermesParser}, C{tool_choice: auto}, as the
    agents send it), and with every tool forced (C{required});
  - cached: the lookup the next turn pays (the tool set's key and a
    cache hit).

Reported as milliseconds and as ratios against the baseline of the same
request in the same run (the machines are shared and noisy).

Covered by tests/unit/test_bench.py; its request parsing is used by
tests/integration/test_agent_grammars.py.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ds4tw._formats.tools.spec import Tooling

#: Where the captured requests are, from a checkout.
FIXTURES = Path("tests/agents/fixtures")


def agent_requests(folder: Path = FIXTURES) -> list[tuple[str, str, dict[str, Any]]]:
    """C{(agent, route, body)} of each captured request with tools."""
    out = []
    for path in sorted(folder.glob("*.json")):
        doc = json.loads(path.read_text())
        body = doc.get("body")
        route = str(doc.get("route") or doc.get("path") or "").split("?")[0]
        if isinstance(body, dict) and body.get("tools"):
            out.append((path.stem, route, body))
    return out


def request_tooling(route: str, body: dict[str, Any]) -> tuple[Tooling, list[dict[str, Any]]]:
    """The request's L{Tooling} and its chat messages, through the dialect's own parser."""
    tooling, messages = _parsed(route, body)
    if tooling is None:
        raise ValueError(f"the request to {route} offers no tools")
    return tooling, messages


def _parsed(route: str, body: dict[str, Any]) -> tuple[Tooling | None, list[dict[str, Any]]]:
    if route.endswith("/messages"):
        from ds4tw._api.anthropic.schema import MessagesRequest

        anthropic = MessagesRequest.model_validate(body)
        return anthropic.tooling(), anthropic.template_messages()[0]
    if route.endswith("/responses"):
        from ds4tw._api.responses.schema import ResponsesRequest

        responses = ResponsesRequest.parse(body)
        return responses.tooling(), responses.template_messages()
    from ds4tw._api.openai.schema import ChatCompletionRequest

    chat = ChatCompletionRequest.model_validate(body)
    return chat.tooling(), chat.template_messages()


def _median_ms(f: Callable[[], object], trials: int) -> float:
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def measure(quick: bool = False, folder: Path = FIXTURES) -> dict[str, Any]:
    from ds4tw._engine.template import ChatTemplate
    from ds4tw._formats.normalise import normalise
    from ds4tw._formats.tools.parsers import GrammarCache, HermesParser
    from ds4tw._formats.tools.prompt import template_inputs
    from ds4tw._formats.tools.spec import ToolChoice
    from ds4tw.testing import ScriptedEngine

    requests = agent_requests(folder)
    if not requests:
        raise RuntimeError(
            f"no captured agent requests with tools in {folder} (run from a checkout)"
        )
    engine = ScriptedEngine()
    template = ChatTemplate(engine.chat_template)
    parser = HermesParser()
    trials = 3 if quick else 9
    out: dict[str, Any] = {"trials": trials, "agents": {}}
    for agent, route, body in requests:

        def baseline(route: str = route, body: dict[str, Any] = body) -> None:
            tooling, messages = request_tooling(route, body)
            msgs, extra = template_inputs(normalise(messages), tooling, template, parser)
            engine.apply_chat_template(msgs, **extra)

        tooling, _ = request_tooling(route, body)
        forced = replace(tooling, choice=ToolChoice("required"))
        cache = GrammarCache()
        grammar, _ = cache.get(parser, tooling)
        base = _median_ms(baseline, trials)
        cold = _median_ms(functools.partial(parser.grammar, tooling), trials)
        cold_forced = _median_ms(functools.partial(parser.grammar, forced), trials)
        cached = _median_ms(functools.partial(cache.get, parser, tooling), trials * 10)
        out["agents"][agent] = {
            "route": route,
            "tools": len(tooling.tools),
            "schema_bytes": len(json.dumps([t.arguments_schema() for t in tooling.tools])),
            "grammar_rules": grammar.gbnf.count("\n") + 1,
            "loosened": grammar.loosened,
            "baseline_ms": round(base, 3),
            "cold_ms": round(cold, 3),
            "cold_forced_ms": round(cold_forced, 3),
            "cached_ms": round(cached, 4),
            "cold_vs_baseline": round(cold / base, 3),
            "cached_vs_baseline": round(cached / base, 4),
        }
    return out
