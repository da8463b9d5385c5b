"""
Constrained decode: what a grammar costs per token, in this process on a
L{ds4tw.LlamaEngine} through C{generate()} (the path the worker drives),
so the numbers are the engine's, not the HTTP layer's.

Every prompt is run four ways, back to back in rotating order (as the
throughput part interleaves stacks): (a) unconstrained, greedy with
C{ignore_eos} and a fixed length; (b) a JSON-schema grammar; (c) a forced
tool call, C{<tool_call>\\n{"name": "get_weather", "arguments": {...}}\\n</tool_call>}
with the call object's grammar from C{json_schema_to_gbnf} (its C{name}
a C{const}). (b) and (c) end when the grammar is complete, so their
lengths differ from (a)'s: the comparison is of decode rates
(L{ds4tw.bench._stats.decode_rate}), and the headline ratios are medians
of per-prompt ratios (b)/(a) and (c)/(a). For (c) it also records the
time from holding the prompt text (templating, tokenization and a full
prefill included: no trial reuses another's KV cache) to the token that
carries the first byte of the C{arguments} value. (d) is C{auto}: the
lazy grammar ds4tw builds for C{tool_choice: auto} with the same tool
(L{ds4tw._formats.tools.parsers.HermesParser}), greedy with C{ignore_eos} and
(a)'s length, so whatever the model writes, the trigger is searched at
every token (and fires if it opens a call).

Exercised by the full benchmark run (it needs the model); the arithmetic
is L{ds4tw.bench._stats}'s.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

from ._settings import Settings
from ._stats import decode_rate, summary

#: The structured-output schema of (b): bounded, so a greedy small model
#: finishes it instead of repeating array items to the token limit.
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
}

#: The whole call object of (c): the tool's name as a constant, then its arguments.
CALL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "unit", "days"],
        },
    },
    "required": ["name", "arguments"],
}

_CITIES = ["Paris", "Lagos", "Osaka", "Quito", "Oslo", "Perth", "Cairo", "Lima", "Turin", "Hanoi"]
_ARGS = re.compile(rb'"arguments"\s*:\s*')


def auto_grammar() -> Any:
    """(d): ds4tw's own lazy grammar for the tool of (c) under C{auto}."""
    from ds4tw._formats.tools.parsers import HermesParser
    from ds4tw._formats.tools.spec import Tooling, ToolSpec

    tool = ToolSpec("get_weather", "", CALL_SCHEMA["properties"]["arguments"])
    return HermesParser().grammar(Tooling((tool,)))


def grammars() -> dict[str, str]:
    """GBNF of (b) and (c)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    call = json_schema_to_gbnf(json.dumps(CALL_SCHEMA))
    # The converter names its top rule root; the call is one part of ours.
    call = re.sub(r"^root ::=", "call ::=", call, flags=re.M)
    tool = 'root ::= "<tool_call>\\n" call "\\n</tool_call>"\n' + call
    return {"json_schema": json_schema_to_gbnf(json.dumps(PERSON_SCHEMA)), "tool_call": tool}


def prompts(n: int) -> list[list[dict[str, str]]]:
    """Chat messages asking for the weather, one city per prompt (no shared prefix to reuse)."""
    system = (
        "You can call the tool get_weather(city, unit, days). To call it, answer with "
        '<tool_call>\n{"name": "get_weather", "arguments": {...}}\n</tool_call>'
    )
    return [
        [
            {"role": "system", "content": f"Request {i + 1}. {system}"},
            {"role": "user", "content": f"What is the weather in {_CITIES[i % len(_CITIES)]}?"},
        ]
        for i in range(n)
    ]


def _trial(engine: Any, messages: list[dict[str, str]], params: Any) -> dict[str, Any]:
    from ds4tw import Token

    start = time.perf_counter()
    chat = engine.apply_chat_template(messages)
    tokens = engine.tokenize(chat.text, add_bos=False)
    times: list[float] = []
    text = b""
    args_at: float | None = None
    gen = engine.generate(tokens, params)
    reason = "length"
    while True:
        try:
            event = next(gen)
        except StopIteration as done:
            reason = done.value
            break
        if isinstance(event, Token):
            now = time.perf_counter() - start
            times.append(now)
            text += event.piece
            if args_at is None:
                m = _ARGS.search(text)
                if m is not None and m.end() < len(text):
                    args_at = now
    intervals = [b - a for a, b in itertools.pairwise(times)]
    return {
        "tokens": len(times),
        "decode_tps": decode_rate(times),
        # 1 / the median token interval: unmoved by a burst of outside load.
        "steady_tps": 1.0 / statistics.median(intervals) if intervals else None,
        "ttft_s": times[0] if times else None,
        "args_first_byte_s": args_at,
        "finish_reason": reason,
        "text": text.decode("utf-8", "replace"),
    }


def measure(settings: Settings, load: Callable[[], Any]) -> dict[str, Any]:
    """
    The three variants on C{settings.constrained_trials} prompts, interleaved;
    C{load} returns a loaded engine (closed here).
    """
    from ds4tw import Grammar, SamplingParams

    engine = load()
    try:
        gbnf = grammars()
        n = settings.constrained_tokens
        variants: dict[str, Any] = {
            "unconstrained": SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
            "json_schema": SamplingParams(
                max_tokens=n, temperature=0.0, grammar=Grammar(gbnf["json_schema"])
            ),
            "tool_call": SamplingParams(
                max_tokens=n, temperature=0.0, grammar=Grammar(gbnf["tool_call"])
            ),
            "tool_auto": SamplingParams(
                max_tokens=n, temperature=0.0, ignore_eos=True, grammar=auto_grammar()
            ),
        }
        names = list(variants)
        all_prompts = prompts(settings.constrained_trials + 1)
        for name in names:  # warm-up: caches, the grammar's vocabulary scan
            _trial(engine, all_prompts[0], variants[name])
        trials: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for k, messages in enumerate(all_prompts[1:]):
            turn = k % len(names)
            for name in names[turn:] + names[:turn]:
                trials[name].append(_trial(engine, messages, variants[name]))
    finally:
        engine.close()
    base = trials["unconstrained"]

    def ratios(name: str, key: str = "decode_tps") -> dict[str, Any]:
        return summary(
            [
                a[key] / b[key] if a[key] and b[key] else None
                for a, b in zip(trials[name], base, strict=True)
            ]
        )

    out: dict[str, Any] = {
        "prompts": settings.constrained_trials,
        "max_tokens": settings.constrained_tokens,
        "where": "in-process LlamaEngine.generate(), greedy",
    }
    for name in names:
        out[name] = {
            "decode_tps": summary([t["decode_tps"] for t in trials[name]]),
            "steady_tps": summary([t["steady_tps"] for t in trials[name]]),
            "ttft_s": summary([t["ttft_s"] for t in trials[name]]),
            "tokens": [t["tokens"] for t in trials[name]],
            "finish_reasons": [t["finish_reason"] for t in trials[name]],
            "sample_text": trials[name][0]["text"][:300] if trials[name] else None,
        }
    out["tool_call"]["args_first_byte_s"] = summary(
        [t["args_first_byte_s"] for t in trials["tool_call"]]
    )
    out["json_schema_ratio"] = ratios("json_schema")
    out["tool_call_ratio"] = ratios("tool_call")
    out["tool_auto_ratio"] = ratios("tool_auto")
    # Cross-checks: a rejected token costs a grammar pass, so constrained
    # intervals are uneven and the steady ratio reads a little higher.
    out["json_schema_steady_ratio"] = ratios("json_schema", "steady_tps")
    out["tool_call_steady_ratio"] = ratios("tool_call", "steady_tps")
    out["tool_auto_steady_ratio"] = ratios("tool_auto", "steady_tps")
    return out


def main(argv: list[str] | None = None) -> int:
    """
    C{python -m ds4tw.bench._constrained [--quick] [--wait-quiet S] [--out FILE]}:
    this part alone, without the servers of a whole run.
    """
    import argparse
    import sys

    from ds4tw import LlamaEngine

    from . import _noise, _report
    from ._settings import make_settings, model_path

    p = argparse.ArgumentParser(prog="python -m ds4tw.bench._constrained")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--out", default=None, help="write the part's JSON here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    s = make_settings(quick=args.quick, model=args.model, threads=args.threads)
    if args.wait_quiet > 0:
        print(f"waited: {_noise.wait_quiet(args.wait_quiet)}", flush=True)

    def load() -> Any:
        engine = LlamaEngine(model_path(s.model), n_ctx=s.ctx, n_threads=s.threads, n_batch=s.batch)
        engine.load()
        return engine

    out = measure(s, load)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    doc: dict[str, Any] = {"constrained": out, "settings": s.as_dict()}
    doc["ratios"] = _report.ratios(doc)
    table = _report.table(doc)
    print(next(line for line in table.splitlines() if line.startswith("constrained decode")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
