"""
The results: ratios to raw, the targets of issues 4, 8, 9 and 10, the JSON document
(and a check of its shape), the printed summary table and the PNG chart.

The JSON is the record; everything else is derived from it (the table
and the chart are drawn from the document, so they can be redrawn from
a committed file). L{validate} is the schema: the smoke test and the
unit tests run it on real and synthetic documents.

Covered by tests/unit/test_bench.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._stats import ratio

SCHEMA = "ds4tw-bench/1"

#: Distributions whose versions are recorded (absent ones are recorded as None).
DISTRIBUTIONS = (
    "ds4tw",
    "llama_cpp_python",
    "twisted",
    "klein",
    "prometheus_client",
    "pydantic",
    "uvicorn",
    "fastapi",
    "sse-starlette",
    "starlette",
    "numpy",
    "matplotlib",
    "psutil",
)

# Issue 4's targets.
DECODE_RATIO_TARGET = 0.97
TTFT_OVERHEAD_TARGET_MS = 5.0
#: Constrained decode over unconstrained decode, same prompts.
CONSTRAINED_RATIO_TARGET = 0.90

#: Issue 8: the median cancel latency inside a step, whatever the batch or
#: token time (llama.cpp checks the abort flag between graph nodes).
CANCEL_PREFILL_MEDIAN_MS = 20.0
CANCEL_DECODE_MEDIAN_MS = 5.0

#: Issue 9: aggregate decode at four streams over one; a short request's
#: TTFT beside a long decode within its own prefill plus this many steps;
#: the worst gap of a stream while another prefills, in steps of that
#: prefill; reactor CPU per token at four streams over one.
BATCHING_AGGREGATE_AT_4_TARGET = 1.4
BATCHING_TTFT_STEPS_TARGET = 2.0
BATCHING_GAP_STEPS_TARGET = 1.5
BATCHING_REACTOR_CPU_TARGET = 1.0

#: Issue 10: the next turn's TTFT from the prompt cache's memory and from
#: its disk (after a restart) over a cold turn's, and the share of an
#: interleaved conversation's turns that reuse the whole previous prompt.
CACHE_RAM_TARGET = 0.10
CACHE_DISK_TARGET = 0.25
CACHE_HIT_RATE_TARGET = 0.90

#: Prefill aging (L{ds4tw._prefill}): the long prompt's steps under a flood
#: of short prompts over the most the aging allows (L{ds4tw.bench._fairness.bound_steps}).
FAIRNESS_BOUND_TARGET = 1.0


def _median(section: Mapping[str, Any] | None, key: str) -> float | None:
    if not section:
        return None
    value = (section.get(key) or {}).get("median")
    return None if value is None else float(value)


def _paired(section: Mapping[str, Any] | None, key: str) -> float | None:
    value = (((section or {}).get("vs_reference") or {}).get(key) or {}).get("median")
    return None if value is None else float(value)


def ratios(doc: Mapping[str, Any]) -> dict[str, Any]:
    """
    Every stack against raw. The headline numbers are paired: the median
    over prompts of (stack / raw) for rates and (stack - raw) for TTFT,
    each pair measured moments apart on the same prompt. The ratios of
    medians (C{*_of_medians}) are kept beside them as a cross-check.
    """
    raw = doc.get("raw")
    out: dict[str, Any] = {}
    stacks = {
        "ds4tw": doc.get("ds4tw"),
        "peer": (doc.get("peer") or {}).get("fixed"),
        "peer_natural": (doc.get("peer") or {}).get("natural"),
    }
    for name, section in stacks.items():
        for key, paired_key in (("decode_tps", "decode_ratio"), ("prefill_tps", "prefill_ratio")):
            label = f"{name}_{key.split('_')[0]}"
            of_medians = ratio(_median(section, key), _median(raw, key))
            paired = _paired(section, paired_key)
            out[label] = paired if paired is not None else of_medians
            out[label + "_of_medians"] = of_medians
        for key in ("ttft_short", "ttft_long"):
            a, b = _median(section, key + "_s"), _median(raw, key + "_s")
            of_medians = None if a is None or b is None else (a - b) * 1e3
            paired = _paired(section, key + "_diff_ms")
            out[f"{name}_{key}_overhead_ms"] = paired if paired is not None else of_medians
            out[f"{name}_{key}_overhead_ms_of_medians"] = of_medians
    for name, section in stacks.items():
        out[f"{name}_steady_decode"] = _paired(section, "steady_decode_ratio")
    out["abort_callback_decode"] = (doc.get("abort_check") or {}).get("ratio")
    out["ds4tw_over_peer_decode"] = ratio(
        _median(doc.get("ds4tw"), "decode_tps"), _median(stacks["peer"], "decode_tps")
    )
    constrained = doc.get("constrained")
    if constrained:
        for name in ("json_schema", "tool_call", "tool_auto"):
            out[f"constrained_{name}_decode"] = _median(constrained, f"{name}_ratio")
    out.update(batching_ratios(doc.get("batching")))
    out.update(cache_ratios(doc.get("cache")))
    out.update(fairness_ratios(doc.get("prefill_fairness")))
    return out


def batching_ratios(b: Mapping[str, Any] | None) -> dict[str, Any]:
    """
    Issue 9's headline numbers: ds4tw's aggregate at N streams over one
    and over raw batched at N (median of paired trials), raw's own
    scaling, the single stream over raw, the TTFT excess in steps, the
    worst gap in prefill steps per --batch, the reactor CPU ratio.
    """
    if not b:
        return {}
    out: dict[str, Any] = {}
    ds, raw = b.get("ds4tw") or {}, b.get("raw") or {}
    for n in b.get("streams") or []:
        entry = ds.get(str(n)) or {}
        out[f"batching_ds4tw_{n}_over_1"] = entry.get("ratio_to_1")
        out[f"batching_ds4tw_{n}_over_raw"] = (entry.get("vs_raw") or {}).get("median")
        out[f"batching_raw_{n}_over_1"] = (raw.get(str(n)) or {}).get("ratio_to_1")
    out["batching_single_over_raw"] = (b.get("single_stream") or {}).get("ds4tw_over_raw")
    out["batching_ttft_excess_steps"] = _median(b.get("ttft"), "excess_steps")
    for batch, g in (b.get("gap") or {}).items():
        out[f"batching_gap_{batch}_steps"] = _median(g, "worst_over_prefill_step")
    out["batching_reactor_cpu_4_over_1"] = (b.get("cpu") or {}).get("ratio_4_to_1")
    return out


def fairness_ratios(f: Mapping[str, Any] | None) -> dict[str, Any]:
    """
    The prefill fairness part's headline numbers: the long prompt's TTFT
    under the flood, with and without aging, over its TTFT alone (without
    aging a lower bound: the flood was stopped), and the short prompts'
    median TTFT with aging over without.
    """
    if not f:
        return {}
    r = f.get("ratios") or {}
    return {
        "fairness_aging_over_alone": r.get("aging_over_alone"),
        "fairness_no_aging_over_alone": r.get("no_aging_over_alone"),
        "fairness_short_aging_over_no_aging": r.get("short_aging_over_no_aging"),
    }


def cache_ratios(c: Mapping[str, Any] | None) -> dict[str, Any]:
    """
    Issue 10's headline numbers: each tier's median TTFT over the median
    cold TTFT, the interleaved hit rates (cache on and off) and prefill
    time on over off.
    """
    if not c:
        return {}
    out: dict[str, Any] = {}
    tier_ratios = (c.get("tiers") or {}).get("ratios") or {}
    for tier in ("slot", "ram", "disk"):
        out[f"cache_{tier}_over_cold"] = (tier_ratios.get(tier) or {}).get("over_cold")
    inter = c.get("interleaved") or {}
    for name in ("on", "off"):
        side = inter.get(name) or {}
        out[f"cache_hit_rate_{name}"] = side.get("hit_rate")
        out[f"cache_token_rate_{name}"] = side.get("token_rate")
    out["cache_prefill_on_over_off"] = inter.get("prefill_on_over_off")
    out["cache_prefill_later_on_over_off"] = inter.get("prefill_later_on_over_off")
    return out


def _target(
    name: str, value: float | None, limit: float | None, unit: str, at_most: bool, note: str
) -> dict[str, Any]:
    met: bool | None
    met = None if value is None or limit is None else value <= limit if at_most else value >= limit
    rel = "<=" if at_most else ">="
    return {
        "name": name,
        "value": value,
        "limit": limit,
        "unit": unit,
        "rule": rel,
        "met": met,
        "note": note,
    }


def targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's targets, each with its measured value and whether it is met."""
    r = doc.get("ratios") or {}
    cancel = doc.get("cancel") or {}
    decode = cancel.get("decode") or {}
    prefill = cancel.get("prefill") or {}
    ka = doc.get("keepalive") or {}
    many = doc.get("many_clients") or {}
    constrained = (
        [
            _target(
                f"constrained decode / unconstrained ({label})",
                r.get(f"constrained_{name}_decode"),
                CONSTRAINED_RATIO_TARGET,
                "ratio",
                False,
                "in-process LlamaEngine, greedy, median of per-prompt ratios",
            )
            for name, label in (
                ("json_schema", "JSON schema"),
                ("tool_call", "forced tool call"),
                ("tool_auto", "tool_choice auto, lazy grammar"),
            )
        ]
        if doc.get("constrained")
        else []
    )
    return [
        _target(
            "ds4tw decode throughput / raw",
            r.get("ds4tw_decode"),
            DECODE_RATIO_TARGET if r.get("ds4tw_decode") is not None else None,
            "ratio",
            False,
            "client-seen SSE tok/s over raw in-process tok/s (medians)",
        ),
        _target(
            "ds4tw TTFT overhead over raw (short prompt)",
            r.get("ds4tw_ttft_short_overhead_ms"),
            TTFT_OVERHEAD_TARGET_MS if r.get("ds4tw_ttft_short_overhead_ms") is not None else None,
            "ms",
            True,
            "median client TTFT minus median raw TTFT (tokenization included in both)",
        ),
        _target(
            "cancel latency in decode, in token times (max)",
            (decode.get("latency_in_units") or {}).get("max"),
            1.0 if decode else None,
            "tokens",
            True,
            "ds4tw's logged latency over the stream's own token interval just before the hang-up",
        ),
        _target(
            "cancel latency in prefill, in prefill batches (max)",
            (prefill.get("latency_in_units") or {}).get("max"),
            1.0 if prefill else None,
            "batches",
            True,
            "ds4tw's logged latency over the slowest full batch of a raw prefill of the same "
            "prompt run just before (scripted: the fixed batch time)",
        ),
        _target(
            "median cancel latency in decode",
            (decode.get("latency_ms") or {}).get("median"),
            CANCEL_DECODE_MEDIAN_MS if decode else None,
            "ms",
            True,
            "issue 8: the abort flag stops a decode step between graph nodes",
        ),
        _target(
            "median cancel latency in prefill",
            (prefill.get("latency_ms") or {}).get("median"),
            CANCEL_PREFILL_MEDIAN_MS if prefill else None,
            "ms",
            True,
            "issue 8: the abort flag stops a prefill batch between graph nodes",
        ),
        _target(
            "decode with the abort callback / without",
            r.get("abort_callback_decode"),
            DECODE_RATIO_TARGET if r.get("abort_callback_decode") is not None else None,
            "ratio",
            False,
            "in-process LlamaEngine, a busy Python thread beside, median of paired ratios",
        ),
        _target(
            "longest keepalive gap (queued, prefill, silent decode)",
            ka.get("max_gap_s"),
            ka.get("limit_s"),
            "s",
            True,
            "every byte-arrival gap on the probe streams; limit K + 0.1 s",
        ),
        _target(
            "longest silence of a waiting client",
            (many.get("max_queued_gap_s") or {}).get("max"),
            many.get("limit_s"),
            "s",
            True,
            f"{many.get('clients')} clients queued behind one job; limit K + 0.1 s",
        ),
        *constrained,
        *batching_targets(doc),
        *fairness_targets(doc),
        *cache_targets(doc),
    ]


def batching_targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 9's targets (none when the batching part did not run)."""
    b = doc.get("batching")
    if not b:
        return []
    r = batching_ratios(b)
    four = (b.get("ds4tw") or {}).get("4") or {}
    every = [e for e in (b.get("ds4tw") or {}).values() if isinstance(e, dict)]
    whole = sum(int(e.get("streams_whole") or 0) for e in every)
    total = sum(int(e.get("streams_total") or 0) for e in every)
    par = b.get("parallel")
    gaps = [
        _target(
            f"worst token gap while another request prefills, --batch {batch}",
            r.get(f"batching_gap_{batch}_steps"),
            BATCHING_GAP_STEPS_TARGET,
            "steps",
            True,
            f"a decoding stream's longest gap during a {_fmt(_median(g, 'prompt_tokens'), '.0f')}"
            "-token prefill over the mean time of a prefill step (/metrics); one step, with "
            "room for jitter",
        )
        for batch, g in (b.get("gap") or {}).items()
    ]
    return [
        _target(
            "aggregate decode, 4 streams / 1 stream",
            r.get("batching_ds4tw_4_over_1"),
            BATCHING_AGGREGATE_AT_4_TARGET,
            "ratio",
            False,
            f"ds4tw --parallel {par}, medians over rounds; "
            f"{four.get('streams_whole')}/{four.get('streams_total')} streams whole at 4",
        ),
        _target(
            "every batched stream whole",
            whole / total if total else None,
            1.0 if total else None,
            "fraction",
            False,
            f"{whole}/{total} streams got max_tokens tokens with finish_reason length",
        ),
        _target(
            "short request TTFT beside a long decode, steps over its TTFT alone",
            r.get("batching_ttft_excess_steps"),
            BATCHING_TTFT_STEPS_TARGET,
            "steps",
            True,
            "median over trials of (TTFT beside - median TTFT idle) / mean step time (/metrics)",
        ),
        _target(
            f"single-stream decode at --parallel {par} / raw single sequence",
            r.get("batching_single_over_raw"),
            DECODE_RATIO_TARGET if r.get("batching_single_over_raw") is not None else None,
            "ratio",
            False,
            "paired with the raw batch loop (llama_decode, same 8-sequence context)",
        ),
        *gaps,
        _target(
            "reactor CPU per token, 4 streams / 1 stream",
            r.get("batching_reactor_cpu_4_over_1"),
            BATCHING_REACTOR_CPU_TARGET,
            "ratio",
            True,
            "twistd main thread (schedstat ns) per streamed token; one hand-off per step",
        ),
    ]


def fairness_targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The prefill aging's bound, in steps (none when the fairness part did not run)."""
    f = doc.get("prefill_fairness")
    if not f:
        return []
    aging, bound = f.get("aging") or {}, f.get("bound_steps")
    sz = f.get("sizes") or {}
    return [
        _target(
            "long prompt's prefill steps under a flood of short prompts / the aging bound",
            ratio(aging.get("steps"), bound),
            FAIRNESS_BOUND_TARGET,
            "ratio",
            True,
            f"{aging.get('steps')} steps, bound {bound} = (AGING_STEPS {f.get('aging_steps')} + 1)"
            f" x {sz.get('long_tokens')}-token prompt's {sz.get('batch')}-token chunks; "
            "machine-independent",
        )
    ]


def cache_targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's targets (none when the cache part did not run)."""
    c = doc.get("cache")
    if not c:
        return []
    r = cache_ratios(c)
    tiers = c.get("tiers") or {}
    prefix = _fmt(_median(tiers, "prompt_tokens"), ".0f")
    proven = [p for got in (tiers.get("proven") or {}).values() for p in got]
    on = (c.get("interleaved") or {}).get("on") or {}
    return [
        _target(
            "next turn's TTFT from the prompt cache's memory / cold",
            r.get("cache_ram_over_cold"),
            CACHE_RAM_TARGET,
            "ratio",
            True,
            f"medians; a {prefix}-token prompt, its slot taken by {c.get('parallel')} other "
            "conversations",
        ),
        _target(
            "next turn's TTFT from disk after a restart / cold",
            r.get("cache_disk_over_cold"),
            CACHE_DISK_TARGET,
            "ratio",
            True,
            f"medians; a {prefix}-token prompt, same --kv-disk-dir, files out of the page cache",
        ),
        _target(
            "interleaved conversations' hit rate",
            r.get("cache_hit_rate_on"),
            CACHE_HIT_RATE_TARGET,
            "fraction",
            False,
            f"{on.get('hits')}/{on.get('turns')} turns after the first reused the previous "
            f"prompt whole; {c.get('sizes', {}).get('conversations')} conversations on "
            f"--parallel {c.get('parallel')}",
        ),
        _target(
            "every tier's turn proven by /metrics",
            sum(proven) / len(proven) if proven else None,
            1.0 if proven else None,
            "fraction",
            False,
            f"{sum(proven)}/{len(proven)} turns: one hit counted from the tier measured "
            "(cold: none of substance), the previous prompt reused whole",
        ),
    ]


# -- the document ----------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil is in the bench extra
        return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    from ds4tw._llama import _cpu_has_amx

    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "amx": _cpu_has_amx(),
        "memory_bytes": _memory_bytes(),
        "python": sys.version.split()[0],
        "loadavg_start": list(os.getloadavg()),
    }


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["ds4tw_git"] = _git_commit()
    return out


# -- schema ------------------------------------------------------------------

_NUM = (int, float)
_SUMMARY_KEYS = ("n", "median", "mean", "min", "max", "p90")

#: Top-level keys and their types; None in a tuple allows null.
_TOP: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "created": (str,),
    "command": (str,),
    "engine": (str,),
    "duration_s": _NUM,
    "machine": (dict,),
    "versions": (dict,),
    "model": (dict,),
    "settings": (dict,),
    "notes": (list,),
    "errors": (list,),
    "raw": (dict, type(None)),
    "ds4tw": (dict, type(None)),
    "peer": (dict, type(None)),
    "ratios": (dict,),
    "cancel": (dict, type(None)),
    "keepalive": (dict, type(None)),
    "many_clients": (dict, type(None)),
    "targets": (list,),
}


def _check_summary(path: str, value: Any, errors: list[str]) -> None:
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a summary object, got {type(value).__name__}")
        return
    for key in _SUMMARY_KEYS:
        if key not in value:
            errors.append(f"{path}.{key}: missing")
        elif key != "n" and value[key] is not None and not isinstance(value[key], _NUM):
            errors.append(f"{path}.{key}: not a number")


def validate(doc: Any) -> list[str]:
    """
    Problems with the shape of a results document (empty when it is
    well-formed). Checks types, the summary objects of every measured
    section, and that the targets are complete; not the values.
    """
    errors: list[str] = []
    if not isinstance(doc, dict):
        return ["document: not an object"]
    for key, types in _TOP.items():
        if key not in doc:
            errors.append(f"{key}: missing")
        elif not isinstance(doc[key], types):
            errors.append(f"{key}: {type(doc[key]).__name__} is not {types}")
    if errors:
        return errors
    if doc["schema"] != SCHEMA:
        errors.append(f"schema: {doc['schema']!r} is not {SCHEMA!r}")
    stacks = {"raw": doc["raw"], "ds4tw": doc["ds4tw"]}
    if doc["peer"] is not None:
        stacks["peer.fixed"] = doc["peer"].get("fixed")
    for name, section in stacks.items():
        if section is None:
            continue
        for key in ("decode_tps", "ttft_short_s", "ttft_long_s", "prefill_tps"):
            _check_summary(f"{name}.{key}", section.get(key), errors)
    if doc["raw"] is None and not doc["notes"]:
        errors.append("notes: raw was skipped without a note saying why")
    if doc["cancel"] is not None:
        for stage in ("decode", "prefill"):
            part = doc["cancel"].get(stage)
            if not isinstance(part, dict):
                errors.append(f"cancel.{stage}: missing")
                continue
            _check_summary(f"cancel.{stage}.latency_ms", part.get("latency_ms"), errors)
            if not isinstance(part.get("trials"), list):
                errors.append(f"cancel.{stage}.trials: not a list")
    if doc["keepalive"] is not None:
        ka = doc["keepalive"]
        _check_summary("keepalive.gaps_s", ka.get("gaps_s"), errors)
        for key in ("keepalive_s", "limit_s"):
            if not isinstance(ka.get(key), _NUM):
                errors.append(f"keepalive.{key}: not a number")
        if not isinstance(ka.get("probes"), list):
            errors.append("keepalive.probes: not a list")
    if doc["many_clients"] is not None:
        many = doc["many_clients"]
        for key in ("clients", "outcomes", "rss_per_waiting_client_bytes", "max_queued_gap_s"):
            if key not in many:
                errors.append(f"many_clients.{key}: missing")
        outcomes = many.get("outcomes") or {}
        if set(outcomes) != {"completed", "cancelled", "error"}:
            errors.append("many_clients.outcomes: expected completed, cancelled, error")
        elif sum(outcomes.values()) != many.get("clients"):
            errors.append("many_clients.outcomes: do not add up to the number of clients")
    constrained = doc.get("constrained")
    if constrained is not None:
        if not isinstance(constrained, dict):
            errors.append("constrained: not an object")
        else:
            for name in ("unconstrained", "json_schema", "tool_call"):
                _check_summary(
                    f"constrained.{name}.decode_tps",
                    (constrained.get(name) or {}).get("decode_tps"),
                    errors,
                )
            for key in ("json_schema_ratio", "tool_call_ratio"):
                _check_summary(f"constrained.{key}", constrained.get(key), errors)
            _check_summary(
                "constrained.tool_call.args_first_byte_s",
                (constrained.get("tool_call") or {}).get("args_first_byte_s"),
                errors,
            )
    batching = doc.get("batching")
    if batching is not None:
        _validate_batching(batching, errors)
    fairness = doc.get("prefill_fairness")
    if fairness is not None:
        _validate_fairness(fairness, errors)
    cache = doc.get("cache")
    if cache is not None:
        _validate_cache(cache, errors)
    for i, t in enumerate(doc["targets"]):
        for key in ("name", "value", "limit", "unit", "rule", "met", "note"):
            if not isinstance(t, dict) or key not in t:
                errors.append(f"targets[{i}].{key}: missing")
    return errors


def _validate_batching(b: Any, errors: list[str]) -> None:
    if not isinstance(b, dict):
        errors.append("batching: not an object")
        return
    for key in ("source", "where"):
        if not isinstance(b.get(key), str):
            errors.append(f"batching.{key}: missing")
    stacks = {"ds4tw": b.get("ds4tw")}
    if b.get("raw") is not None:
        stacks["raw"] = b.get("raw")
    for name, section in stacks.items():
        if not isinstance(section, dict):
            errors.append(f"batching.{name}: missing")
            continue
        for n in b.get("streams") or []:
            entry = section.get(str(n))
            if not isinstance(entry, dict):
                errors.append(f"batching.{name}.{n}: missing")
                continue
            _check_summary(f"batching.{name}.{n}.aggregate_tps", entry.get("aggregate_tps"), errors)
    ttft = b.get("ttft")
    if not isinstance(ttft, dict):
        errors.append("batching.ttft: missing")
    else:
        for key in ("alone_ttft_s", "busy_ttft_s", "excess_steps"):
            _check_summary(f"batching.ttft.{key}", ttft.get(key), errors)
    gap = b.get("gap")
    if not isinstance(gap, dict) or not gap:
        errors.append("batching.gap: missing")
    else:
        for batch, g in gap.items():
            for key in ("worst_gap_s", "median_gap_before_s", "prefill_step_s", "prefill_s"):
                _check_summary(f"batching.gap.{batch}.{key}", (g or {}).get(key), errors)


def _validate_fairness(f: Any, errors: list[str]) -> None:
    if not isinstance(f, dict):
        errors.append("prefill_fairness: not an object")
        return
    for key in ("source", "where"):
        if not isinstance(f.get(key), str):
            errors.append(f"prefill_fairness.{key}: missing")
    alone = f.get("alone")
    if not isinstance(alone, dict):
        errors.append("prefill_fairness.alone: missing")
    else:
        _check_summary("prefill_fairness.alone.long_ttft_s", alone.get("long_ttft_s"), errors)
    for name in ("aging", "no_aging"):
        v = f.get(name)
        if not isinstance(v, dict):
            errors.append(f"prefill_fairness.{name}: missing")
            continue
        for key in ("long_ttft_s", "steps", "led"):
            if not isinstance(v.get(key), _NUM):
                errors.append(f"prefill_fairness.{name}.{key}: not a number")
        _check_summary(f"prefill_fairness.{name}.short_ttft_s", v.get("short_ttft_s"), errors)
    if not isinstance(f.get("bound_steps"), int):
        errors.append("prefill_fairness.bound_steps: not an integer")


def _validate_cache(c: Any, errors: list[str]) -> None:
    if not isinstance(c, dict):
        errors.append("cache: not an object")
        return
    for key in ("source", "where"):
        if not isinstance(c.get(key), str):
            errors.append(f"cache.{key}: missing")
    if c.get("tiers") is None and c.get("interleaved") is None:
        errors.append("cache: neither tiers nor interleaved")
    tiers = c.get("tiers")
    if tiers is not None:
        for tier in ("cold", "slot", "ram", "disk"):
            _check_summary(
                f"cache.tiers.ttft_s.{tier}", (tiers.get("ttft_s") or {}).get(tier), errors
            )
        if not isinstance(tiers.get("ratios"), dict):
            errors.append("cache.tiers.ratios: missing")
    inter = c.get("interleaved")
    if inter is not None:
        for name in ("on", "off"):
            side = inter.get(name)
            if not isinstance(side, dict):
                errors.append(f"cache.interleaved.{name}: missing")
                continue
            for key in ("hit_rate", "token_rate", "prefill_s"):
                if key not in side:
                    errors.append(f"cache.interleaved.{name}.{key}: missing")


def write_json(doc: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")


# -- the table ---------------------------------------------------------------


def _fmt(value: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value * scale, spec)


def table(doc: Mapping[str, Any]) -> str:
    """The printed summary: throughput, TTFT, cancel, keepalive, many clients, targets."""
    raw, ds, peer = doc.get("raw"), doc.get("ds4tw"), (doc.get("peer") or {}).get("fixed")
    natural = (doc.get("peer") or {}).get("natural")
    lines = [
        f"ds4tw-bench ({doc.get('engine')}, {'quick' if doc['settings'].get('quick') else 'full'})",
        "",
        f"{'median':<28}{'raw':>10}{'ds4tw':>10}{'peer':>10}{'ds4tw/raw':>11}{'peer/raw':>10}",
    ]

    r = doc.get("ratios") or {}

    def row(label: str, key: str, scale: float, spec: str, rel: str) -> None:
        vals = [_median(s, key) for s in (raw, ds, peer)]
        rels = [r.get(f"{name}_{rel}") for name in ("ds4tw", "peer")]
        rel_spec = ".3f" if "overhead" not in rel else "+.1f"
        lines.append(
            f"{label:<28}"
            + "".join(f"{_fmt(v, spec, scale):>10}" for v in vals)
            + f"{_fmt(rels[0], rel_spec):>11}{_fmt(rels[1], rel_spec):>10}"
        )

    row("decode tok/s", "decode_tps", 1, ".1f", "decode")
    row("decode tok/s, steady", "steady_tps", 1, ".1f", "steady_decode")
    row("prefill tok/s (prompt/TTFT)", "prefill_tps", 1, ".0f", "prefill")
    row("TTFT short ms (+ms)", "ttft_short_s", 1e3, ".1f", "ttft_short_overhead_ms")
    row("TTFT long ms (+ms)", "ttft_long_s", 1e3, ".1f", "ttft_long_overhead_ms")

    def cpu(label: str, key: str) -> None:
        vals = [((sec or {}).get("cpu_per_token") or {}).get(key) for sec in (raw, ds, peer)]
        if any(v is not None for v in vals):
            lines.append(f"{label:<28}" + "".join(f"{_fmt(v, '.3f'):>10}" for v in vals))

    cpu("CPU ms/token, main thread", "main_ms")
    cpu("CPU ms/token, all threads", "total_ms")
    cpu("CPU ms/token, bench client", "client_ms")
    if natural:
        lines.append(
            f"{'peer decode, no logit_bias':<28}{'':>10}{'':>10}"
            f"{_fmt(_median(natural, 'decode_tps')):>10}{'':>11}"
            f"{_fmt(r.get('peer_natural_decode'), '.3f'):>10}"
        )
    lines.append("(ratios and +ms: medians of per-prompt pairs, each pair measured back to back)")
    cancel = doc.get("cancel") or {}
    if cancel:
        lines.append("")
        for stage, unit, key in (
            ("decode", "token", "token_time_ms"),
            ("prefill", "batch", "batch_time_ms"),
        ):
            part = cancel.get(stage) or {}
            lat, ref = part.get("latency_ms") or {}, part.get(key) or {}
            units = part.get("latency_in_units") or {}
            lines.append(
                f"cancel in {stage + ':':<9} latency median {_fmt(lat.get('median'), '.2f')} ms, "
                f"max {_fmt(lat.get('max'), '.2f')} ms (n={lat.get('n')}); one {unit} "
                f"{_fmt(ref.get('median'), '.1f')} ms median; max {_fmt(units.get('max'), '.2f')} "
                f"{'tokens' if unit == 'token' else 'batches'}"
            )
    con = doc.get("constrained") or {}
    if con:
        lines.append("")
        lines.append(
            f"constrained decode ({con.get('where')}, {con.get('prompts')} prompts): "
            f"unconstrained {_fmt(_median(con.get('unconstrained'), 'decode_tps'))} tok/s, "
            f"JSON schema {_fmt(_median(con.get('json_schema'), 'decode_tps'))} tok/s "
            f"(x{_fmt(_median(con, 'json_schema_ratio'), '.3f')}), forced tool call "
            f"{_fmt(_median(con.get('tool_call'), 'decode_tps'))} tok/s "
            f"(x{_fmt(_median(con, 'tool_call_ratio'), '.3f')}), auto (lazy) "
            f"{_fmt(_median(con.get('tool_auto'), 'decode_tps'))} tok/s "
            f"(x{_fmt(_median(con, 'tool_auto_ratio'), '.3f')}); steady-rate ratios "
            f"x{_fmt(_median(con, 'json_schema_steady_ratio'), '.3f')}, "
            f"x{_fmt(_median(con, 'tool_call_steady_ratio'), '.3f')}; first argument byte "
            f"{_fmt(_median(con.get('tool_call'), 'args_first_byte_s'), '.1f', 1e3)} ms "
            "from the prompt text"
        )
    lines += batching_table(doc.get("batching"))
    lines += fairness_table(doc.get("prefill_fairness"))
    lines += cache_table(doc.get("cache"))
    ka = doc.get("keepalive") or {}
    if ka:
        lines.append(
            f"keepalive K={ka.get('keepalive_s')} s: longest gap {_fmt(ka.get('max_gap_s'), '.3f')}"
            f" s (limit {_fmt(ka.get('limit_s'), '.2f')} s); silent decode verified: "
            f"{_fmt(ka.get('silent_decode_verified'))}; stages seen: "
            f"{_fmt(ka.get('all_stages_seen'))}"
        )
    many = doc.get("many_clients") or {}
    if many:
        o = many.get("outcomes") or {}
        per = many.get("rss_per_waiting_client_bytes")
        lines.append(
            f"{many.get('clients')} waiting clients: completed {o.get('completed')}, "
            f"cancelled {o.get('cancelled')}, errors {o.get('error')}; longest silence "
            f"{_fmt((many.get('max_queued_gap_s') or {}).get('max'), '.3f')} s; "
            f"RSS/connection {_fmt(per, '.1f', 1 / 1024)} KiB; accounted: "
            f"{_fmt(many.get('all_accounted'))}"
        )
    lines += ["", "targets:"]
    for t in doc.get("targets") or []:
        verdict = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
        lines.append(
            f"  [{verdict}] {t['name']}: {_fmt(t['value'], '.3f')} {t['rule']} "
            f"{_fmt(t['limit'], '.3f')} {t['unit']}"
        )
    for note in doc.get("notes") or []:
        lines.append(f"note: {note}")
    for error in doc.get("errors") or []:
        lines.append(f"error: {error.splitlines()[0] if error else error}")
    return "\n".join(lines)


def _noisiest(*entries: Mapping[str, Any]) -> float | None:
    """The highest foreign load (cores) over the trials of some scaling entries."""
    values = [(e.get("foreign_cores") or {}).get("max") for e in entries]
    clean = [float(v) for v in values if v is not None]
    return max(clean) if clean else None


def batching_table(b: Mapping[str, Any] | None) -> list[str]:
    """The batching part's lines of the printed summary (none when it did not run)."""
    if not b:
        return []
    ds, raw = b.get("ds4tw") or {}, b.get("raw") or {}
    lines = [
        "",
        f"continuous batching (--parallel {b.get('parallel')}, {b.get('decode_tokens')} tokens "
        f"per stream, {b.get('rounds')} round(s)):",
        f"{'streams':<10}{'raw tok/s':>10}{'x1':>7}{'ds4tw tok/s':>13}{'x1':>7}{'/raw':>8}"
        f"{'per stream':>12}{'whole':>8}{'batch':>7}{'reactor ms/tok':>16}{'noise':>7}",
    ]
    cpu = b.get("cpu") or {}
    for n in b.get("streams") or []:
        d, w = ds.get(str(n)) or {}, raw.get(str(n)) or {}
        lines.append(
            f"{n:<10}{_fmt(_median(w, 'aggregate_tps')):>10}{_fmt(w.get('ratio_to_1'), '.2f'):>7}"
            f"{_fmt(_median(d, 'aggregate_tps')):>13}{_fmt(d.get('ratio_to_1'), '.2f'):>7}"
            f"{_fmt(_median(d, 'vs_raw'), '.3f'):>8}{_fmt(_median(d, 'per_stream_tps')):>12}"
            f"{str(d.get('streams_whole')) + '/' + str(d.get('streams_total')):>8}"
            f"{_fmt(_median(d, 'mean_batch_size'), '.1f'):>7}"
            f"{_fmt((cpu.get(str(n)) or {}).get('main_ms_per_token'), '.3f'):>16}"
            f"{_fmt(_noisiest(d, w), '.2f'):>7}"
        )
    lines.append("(noise: the most cores other processes used during one of that row's trials)")
    single = b.get("single_stream") or {}
    lines.append(
        f"single stream / raw: {_fmt(single.get('ds4tw_over_raw'), '.3f')} (paired, --parallel "
        f"{b.get('parallel')}); throughput part: {_fmt(single.get('throughput_part_ratio'), '.3f')}"
    )
    t = b.get("ttft") or {}
    if t:
        lines.append(
            f"short TTFT: idle {_fmt(_median(t, 'alone_ttft_s'), '.1f', 1e3)} ms, beside a long "
            f"decode {_fmt(_median(t, 'busy_ttft_s'), '.1f', 1e3)} ms (max "
            f"{_fmt((t.get('busy_ttft_s') or {}).get('max'), '.1f', 1e3)}); step "
            f"{_fmt((t.get('steps') or {}).get('mean_step_s'), '.1f', 1e3)} ms; excess "
            f"{_fmt(_median(t, 'excess_steps'), '.2f')} steps median, "
            f"{_fmt((t.get('excess_steps') or {}).get('max'), '.2f')} max; overlapped "
            f"{t.get('overlapped')}/{t.get('trials')}"
        )
    for batch, g in (b.get("gap") or {}).items():
        lines.append(
            f"gap, --batch {batch}: worst {_fmt(_median(g, 'worst_gap_s'), '.1f', 1e3)} ms vs "
            f"median before {_fmt(_median(g, 'median_gap_before_s'), '.1f', 1e3)} ms, prefill "
            f"step {_fmt(_median(g, 'prefill_step_s'), '.1f', 1e3)} ms "
            f"({_fmt(_median(g, 'worst_over_prefill_step'), '.2f')} steps); prefill of "
            f"{_fmt(_median(g, 'prompt_tokens'), '.0f')} tokens "
            f"{_fmt(_median(g, 'prefill_s'), '.2f')} s"
        )
    if cpu:
        lines.append(
            f"reactor CPU/token 4 streams / 1: {_fmt(cpu.get('ratio_4_to_1'), '.3f')} (schedstat), "
            f"{_fmt(cpu.get('ratio_4_to_1_ticks'), '.3f')} (stat ticks)"
        )
    for note in b.get("notes") or []:
        lines.append(f"batching note: {note}")
    return lines


def fairness_table(f: Mapping[str, Any] | None) -> list[str]:
    """The prefill fairness part's lines of the printed summary (none when it did not run)."""
    if not f:
        return []
    sz = f.get("sizes") or {}
    alone = f.get("alone") or {}
    lines = [
        "",
        f"prefill fairness ({f.get('where')}): a {sz.get('long_tokens')}-token prompt, "
        f"{sz.get('flood_slots')} slots flooded with {sz.get('short_tokens')}-token "
        "max_tokens=1 prompts:",
        f"{'':<18}{'long TTFT s':>12}{'x alone':>9}{'steps':>7}{'led':>5}{'shorts':>8}"
        f"{'short TTFT ms':>15}{'(steps)':>9}{'noise':>7}",
        f"{'alone':<18}{_fmt(_median(alone, 'long_ttft_s'), '.2f'):>12}"
        f"{_fmt(1.0 if _median(alone, 'long_ttft_s') else None, '.2f'):>9}"
        f"{'/'.join(str(n) for n in alone.get('steps') or []):>7}"
        f"{'/'.join(str(n) for n in alone.get('led') or []):>5}{'-':>8}{'-':>15}{'-':>9}"
        f"{_fmt((alone.get('foreign_cores') or {}).get('max'), '.2f'):>7}",
    ]
    for name, label in (("aging", "flood, aging"), ("no_aging", "flood, no aging")):
        v = f.get(name) or {}
        capped = "+" if v.get("capped") else ""
        lines.append(
            f"{label:<18}{_fmt(v.get('long_ttft_s'), '.2f') + capped:>12}"
            f"{_fmt(v.get('over_alone'), '.2f') + capped:>9}{v.get('steps', '-'):>7}"
            f"{v.get('led', '-'):>5}{v.get('shorts_done', '-'):>8}"
            f"{_fmt(_median(v, 'short_ttft_s'), '.0f', 1e3):>15}"
            f"{_fmt(_median(v, 'short_ttft_steps'), '.0f'):>9}"
            f"{_fmt(v.get('foreign_cores'), '.2f'):>7}"
        )
    off = f.get("no_aging") or {}
    if off.get("capped"):
        lines.append(
            f"(+: a lower bound; without aging the flood was stopped after {off.get('cap_steps')} "
            f"steps, when the long prompt had prefilled {off.get('long_prefilled_at_cap')}/"
            f"{sz.get('long_tokens')} tokens)"
        )
    r = f.get("ratios") or {}
    lines.append(
        f"aging bound {f.get('bound_steps')} steps, within: {_fmt(f.get('within_bound'))}; "
        f"shorts' median TTFT with aging / without: "
        f"{_fmt(r.get('short_aging_over_no_aging'), '.2f')}; largest reused prefix "
        f"{f.get('cached_tokens_max')} tokens; noise: cores other processes used"
    )
    for note in f.get("notes") or []:
        lines.append(f"fairness note: {note}")
    return lines


def cache_table(c: Mapping[str, Any] | None) -> list[str]:
    """The cache part's lines of the printed summary (none when it did not run)."""
    if not c:
        return []
    lines = ["", f"prompt cache (--parallel {c.get('parallel')}):"]
    tiers = c.get("tiers") or {}
    if tiers:
        ttft, cached = tiers.get("ttft_s") or {}, tiers.get("cached_tokens") or {}
        ratios, proven = tiers.get("ratios") or {}, tiers.get("proven") or {}
        noise = tiers.get("foreign_cores") or {}
        lines.append(
            f"{'turn':<10}{'TTFT ms':>10}{'/cold':>8}{'paired':>8}{'cached':>8}{'proven':>8}"
            f"{'n':>4}{'noise':>7}  (prompt {_fmt(_median(tiers, 'prompt_tokens'), '.0f')} tokens)"
        )
        for tier in ("cold", "slot", "ram", "disk"):
            r = ratios.get(tier) or {}
            flags = proven.get(tier) or []
            lines.append(
                f"{tier:<10}{_fmt(_median(ttft, tier), '.1f', 1e3):>10}"
                f"{_fmt(1.0 if tier == 'cold' and flags else r.get('over_cold'), '.3f'):>8}"
                f"{_fmt(_median(r, 'paired_over_cold'), '.3f'):>8}"
                f"{_fmt(_median(cached, tier), '.0f'):>8}"
                f"{str(sum(flags)) + '/' + str(len(flags)):>8}"
                f"{(ttft.get(tier) or {}).get('n', 0):>4}"
                f"{_fmt((noise.get(tier) or {}).get('max'), '.2f'):>7}"
            )
        shutdown = tiers.get("shutdown") or {}
        disk = shutdown.get("disk") or {}
        lines.append(
            f"restart: shutdown {_fmt(shutdown.get('s'), '.2f')} s (exit "
            f"{shutdown.get('exit_code')}), {disk.get('files')} files "
            f"{_fmt(disk.get('bytes'), '.1f', 2**-20)} MiB on disk; ready again in "
            f"{_fmt((tiers.get('restart') or {}).get('ready_s'), '.2f')} s"
        )
        lines.append("(noise: the most cores other processes used during one of that row's turns)")
    inter = c.get("interleaved") or {}
    if inter:
        lines.append(
            f"interleaved, {inter.get('conversations')} conversations x {inter.get('turns')} "
            f"turns:{'hits':>8}{'rate':>7}{'tokens':>8}{'prefill s':>11}{'later s':>9}"
            f"{'TTFT s':>8}"
        )
        for name, label in (("on", "cache on"), ("off", "slots only")):
            side = inter.get(name) or {}
            lines.append(
                f"  {label:<33}{str(side.get('hits')) + '/' + str(side.get('turns')):>8}"
                f"{_fmt(side.get('hit_rate'), '.2f'):>7}{_fmt(side.get('token_rate'), '.2f'):>8}"
                f"{_fmt(side.get('prefill_s'), '.2f'):>11}"
                f"{_fmt(side.get('prefill_later_s'), '.2f'):>9}{_fmt(side.get('ttft_s'), '.2f'):>8}"
            )
        answers = inter.get("answers") or {}
        lines.append(
            f"  prefill on/off {_fmt(inter.get('prefill_on_over_off'), '.3f')} (turns after the "
            f"first {_fmt(inter.get('prefill_later_on_over_off'), '.3f')}); answers on the same "
            f"prompt identical {answers.get('identical')}/{answers.get('compared')}; noise "
            f"{_fmt((inter.get('foreign_cores') or {}).get('max'), '.2f')} cores at most"
        )
        for d in answers.get("divergences") or []:
            lines.append(
                f"  answers differ: conversation {d.get('conversation')} turn {d.get('turn')} "
                f"(cached {d.get('cached_tokens')}, from {d.get('sources')}): "
                + " vs ".join(repr(a) for a in d.get("answers") or [])
            )
    for note in c.get("notes") or []:
        lines.append(f"cache note: {note}")
    for error in c.get("errors") or []:
        lines.append(f"cache error: {error.splitlines()[0] if error else error}")
    return lines


# -- the chart ---------------------------------------------------------------


def chart(doc: Mapping[str, Any], path: Path) -> None:
    """
    Three panels: throughput ratios to raw, the keepalive gap histogram
    against K and K + 0.1 s, and cancel latencies against their limits.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = doc.get("ratios") or {}
    batching = doc.get("batching")
    cache = doc.get("cache")
    panels = 3 + bool(batching) + bool(cache)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.6))
    ax = axes[0]
    bars = [
        ("ds4tw\ndecode", r.get("ds4tw_decode"), "tab:blue"),
        ("peer\ndecode", r.get("peer_decode"), "tab:orange"),
        ("peer decode\nno bias", r.get("peer_natural_decode"), "navajowhite"),
        ("ds4tw\nprefill", r.get("ds4tw_prefill"), "tab:blue"),
        ("peer\nprefill", r.get("peer_prefill"), "tab:orange"),
    ]
    shown = [(label, v, c) for label, v, c in bars if v is not None]
    if shown:
        ax.bar([b[0] for b in shown], [b[1] for b in shown], color=[b[2] for b in shown])
        for i, (_, v, _) in enumerate(shown):
            ax.text(i, v + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=9)
        ax.axhline(DECODE_RATIO_TARGET, color="green", linestyle="--", label="decode target 0.97")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_ylim(0, max(1.1, max(b[1] for b in shown) + 0.1))
    else:
        why = "scripted engine" if doc.get("engine") == "scripted" else "no throughput part"
        ax.text(0.5, 0.5, f"no raw baseline\n({why})", ha="center", va="center")
    ax.set_title("throughput / raw llama-cpp-python")
    ax.set_ylabel("ratio (median of per-prompt pairs)")

    ax = axes[1]
    ka = doc.get("keepalive") or {}
    gaps_ms = [g * 1e3 for p in ka.get("probes") or [] for g in p.get("gaps_s") or []]
    many = doc.get("many_clients") or {}
    silences_ms = [g * 1e3 for g in (many.get("max_queued_gap_s") or {}).get("values") or []]
    if gaps_ms:
        ax.hist(gaps_ms, bins=40, color="tab:blue", label="probe: every gap")
        if silences_ms:
            ax.hist(
                silences_ms,
                bins=40,
                color="tab:orange",
                alpha=0.6,
                label=f"{many.get('clients')} waiting clients: longest gap each",
            )
        k = float(ka["keepalive_s"]) * 1e3
        ax.axvline(k, color="gray", linestyle=":", label=f"K = {k:.0f} ms")
        ax.axvline(k + 100, color="red", linestyle="--", label=f"limit K+100 = {k + 100:.0f} ms")
        ax.legend(fontsize=8)
    ax.set_title("keepalive: gaps between bytes on a stream")
    ax.set_xlabel("gap (ms)")
    ax.set_ylabel("count")

    ax = axes[2]
    cancel = doc.get("cancel") or {}
    for x, stage in enumerate(("decode", "prefill")):
        part = cancel.get(stage) or {}
        values = (part.get("latency_in_units") or {}).get("values") or []
        ax.scatter([x] * len(values), values, color="tab:blue", zorder=3)
    ax.axhline(1.0, color="red", linestyle="--", label="limit: 1 token / 1 batch")
    ax.set_xticks([0, 1], ["decode\n(in token times)", "prefill\n(in prefill batches)"])
    shown_units = [
        v
        for stage in ("decode", "prefill")
        for v in ((cancel.get(stage) or {}).get("latency_in_units") or {}).get("values") or []
    ]
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylim(0, max([1.5, *[v + 0.1 for v in shown_units]]))
    ax.legend(fontsize=8)
    ax.set_title("cancel latency (ds4tw log) / its limit")
    ax.set_ylabel("latency / (one token or one batch)")
    if batching:
        _batching_panel(axes[3], batching)
    if cache:
        _cache_panel(axes[-1], cache)
    fig.suptitle(
        f"ds4tw-bench: {doc.get('engine')} engine, {doc['machine'].get('cpus')} CPUs, "
        f"{doc['model'].get('name', '')}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _batching_panel(ax: Any, b: Mapping[str, Any]) -> None:
    """Aggregate decode tok/s by concurrent streams, raw batched and ds4tw."""
    streams = list(b.get("streams") or [])
    for name, color in (("raw", "tab:gray"), ("ds4tw", "tab:blue")):
        section = b.get(name) or {}
        points = [
            (n, _median(section.get(str(n)), "aggregate_tps"))
            for n in streams
            if _median(section.get(str(n)), "aggregate_tps") is not None
        ]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", color=color, label=f"{name} aggregate")
        for x, y in points:
            x1 = (section.get(str(x)) or {}).get("ratio_to_1")
            if x1 is not None:
                ax.annotate(
                    f"x{x1:.2f}",
                    (x, y),
                    textcoords="offset points",
                    # raw's above its point, ds4tw's below: the lines run close.
                    xytext=(0, 6) if name == "raw" else (0, -13),
                    ha="center",
                    fontsize=8,
                    color=color,
                )
    one = _median((b.get("ds4tw") or {}).get("1"), "aggregate_tps")
    if one is not None:
        ax.axhline(
            one * BATCHING_AGGREGATE_AT_4_TARGET,
            color="green",
            linestyle="--",
            label=f"target at 4: {BATCHING_AGGREGATE_AT_4_TARGET}x one stream",
        )
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax.set_xticks(streams)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate decode tok/s (median)")
    ax.set_title(f"continuous batching (--parallel {b.get('parallel')})")
    ax.legend(fontsize=8)


def _cache_panel(ax: Any, c: Mapping[str, Any]) -> None:
    """The next turn's TTFT by tier over cold, against the targets; the interleaved hit rates."""
    ratios = ((c.get("tiers") or {}).get("ratios")) or {}
    bars = [
        (tier, (ratios.get(tier) or {}).get("over_cold"), limit)
        for tier, limit in (("slot", None), ("ram", CACHE_RAM_TARGET), ("disk", CACHE_DISK_TARGET))
    ]
    inter = c.get("interleaved") or {}
    for name in ("on", "off"):
        rate = (inter.get(name) or {}).get("hit_rate")
        bars.append(
            (f"hit rate\ncache {name}", rate, CACHE_HIT_RATE_TARGET if name == "on" else None)
        )
    for i, (_, value, limit) in enumerate(bars):
        if value is None:
            continue
        ax.bar(i, value, color="tab:blue" if i < 3 else "tab:green")
        ax.text(i, value + 0.01, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
        if limit is not None:
            ax.hlines(limit, i - 0.4, i + 0.4, color="red", linestyle="--")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("TTFT / cold TTFT; hit rate")
    ax.set_title(f"prompt cache (--parallel {c.get('parallel')}; red: targets)")
