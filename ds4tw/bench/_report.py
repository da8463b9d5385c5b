"""
The results: the JSON document (and a check of its shape), its ratios
and targets, the printed summary table and the PNG chart, each put
together from the registered parts (L{ds4tw.bench._parts.PARTS}: every
part owns its ratios, targets, validation and table).

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

from ._parts import (
    _NUM,
    DECODE_RATIO_TARGET,
    PARTS,
    Batching,
    Cache,
    fmt,
    median,
)

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


def ratios(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Every part's headline numbers (L{ds4tw.bench._parts.Part.ratios})."""
    out: dict[str, Any] = {}
    for part in PARTS:
        out.update(part.ratios(doc))
    return out


def targets(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every part's targets, each with its measured value and whether it is met."""
    return [t for part in PARTS for t in part.targets(doc)]


# -- the document ----------------------------------------------------------


def cpu_info() -> tuple[str, bool]:
    """The CPU's model name, and whether it has AMX (its C{amx_tile} flag)."""
    model, amx = "", False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    amx = amx or "amx_tile" in line.split()
    except OSError:
        pass
    return model or platform.processor(), amx


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
    cpu, amx = cpu_info()
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "amx": amx,
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


def validate(doc: Any) -> list[str]:
    """
    Problems with the shape of a results document (empty when it is
    well-formed). Checks types, every part's section (its summary
    objects), and that the targets are complete; not the values.
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
    for part in PARTS:
        part.validate(doc, errors)
    for i, t in enumerate(doc["targets"]):
        for key in ("name", "value", "limit", "unit", "rule", "met", "note"):
            if not isinstance(t, dict) or key not in t:
                errors.append(f"targets[{i}].{key}: missing")
    return errors


def write_json(doc: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")


# -- the table ---------------------------------------------------------------


def table(doc: Mapping[str, Any]) -> str:
    """The printed summary: every part's lines, then the targets, notes and errors."""
    lines = [
        f"ds4tw-bench ({doc.get('engine')}, {'quick' if doc['settings'].get('quick') else 'full'})",
        "",
    ]
    for part in PARTS:
        lines += part.table(doc)
    lines += ["", "targets:"]
    for t in doc.get("targets") or []:
        verdict = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
        lines.append(
            f"  [{verdict}] {t['name']}: {fmt(t['value'], '.3f')} {t['rule']} "
            f"{fmt(t['limit'], '.3f')} {t['unit']}"
        )
    for note in doc.get("notes") or []:
        lines.append(f"note: {note}")
    for error in doc.get("errors") or []:
        lines.append(f"error: {error.splitlines()[0] if error else error}")
    return "\n".join(lines)


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
            (n, median(section.get(str(n)), "aggregate_tps"))
            for n in streams
            if median(section.get(str(n)), "aggregate_tps") is not None
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
    one = median((b.get("ds4tw") or {}).get("1"), "aggregate_tps")
    if one is not None:
        ax.axhline(
            one * Batching.AGGREGATE_AT_4_TARGET,
            color="green",
            linestyle="--",
            label=f"target at 4: {Batching.AGGREGATE_AT_4_TARGET}x one stream",
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
        for tier, limit in (("slot", None), ("ram", Cache.RAM_TARGET), ("disk", Cache.DISK_TARGET))
    ]
    inter = c.get("interleaved") or {}
    for name in ("on", "off"):
        rate = (inter.get(name) or {}).get("hit_rate")
        bars.append(
            (f"hit rate\ncache {name}", rate, Cache.HIT_RATE_TARGET if name == "on" else None)
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
