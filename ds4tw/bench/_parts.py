"""
The report's parts, one class each: what a part derives from its own
section of the results document (its headline L{Part.ratios}, its
L{Part.targets}, the check of its section's shape in L{Part.validate}
and its lines of the printed summary in L{Part.table}), all in one
place, registered in L{PARTS}. A new part is one class and one entry.

L{ds4tw.bench._report} runs every registered part in L{PARTS}' order
for each of the four, so the order of the ratios, the targets and the
summary's sections is that list's.

Covered by tests/unit/test_bench.py, tests/unit/test_bench_models.py and
tests/unit/test_bench_dialects.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _dialects, _models, _parsers
from ._stats import ratio

#: The throughput targets: ds4tw's decode over raw (also the abort callback's
#: and the batched single stream's), its TTFT overhead over raw.
DECODE_RATIO_TARGET = 0.97
TTFT_OVERHEAD_TARGET_MS = 5.0

_NUM = (int, float)
_SUMMARY_KEYS = ("n", "median", "mean", "min", "max", "p90")


# -- what every part reads and writes with -----------------------------------


def median(section: Mapping[str, Any] | None, key: str) -> float | None:
    """The median of the summary C{section[key]} (None when absent)."""
    if not section:
        return None
    value = (section.get(key) or {}).get("median")
    return None if value is None else float(value)


def _paired(section: Mapping[str, Any] | None, key: str) -> float | None:
    value = (((section or {}).get("vs_reference") or {}).get(key) or {}).get("median")
    return None if value is None else float(value)


def target(
    name: str, value: float | None, limit: float | None, unit: str, at_most: bool, note: str
) -> dict[str, Any]:
    """One target's entry: its value against its limit, and whether it is met (None: unknown)."""
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


def check_summary(path: str, value: Any, errors: list[str]) -> None:
    """Note in C{errors} what is wrong with the summary (L{ds4tw.bench._stats}) at C{path}."""
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a summary object, got {type(value).__name__}")
        return
    for key in _SUMMARY_KEYS:
        if key not in value:
            errors.append(f"{path}.{key}: missing")
        elif key != "n" and value[key] is not None and not isinstance(value[key], _NUM):
            errors.append(f"{path}.{key}: not a number")


def fmt(value: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    """A table cell: C{-} for None, yes/no for a bool, else C{value * scale} in C{spec}."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value * scale, spec)


def noisiest(*entries: Mapping[str, Any]) -> float | None:
    """The highest foreign load (cores) over the trials of some scaling entries."""
    values = [(e.get("foreign_cores") or {}).get("max") for e in entries]
    clean = [float(v) for v in values if v is not None]
    return max(clean) if clean else None


class Part:
    """
    One part of the report, reading the document's C{key} section (None
    or absent: the part did not run, and it adds nothing).
    """

    #: The document's top-level key this part fills.
    key: str = ""

    def section(self, doc: Mapping[str, Any]) -> Any:
        return doc.get(self.key)

    def ratios(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The part's headline numbers, for the document's C{ratios}."""
        return {}

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The part's targets (L{target}), read from C{doc["ratios"]} and its section."""
        return []

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        """Note in C{errors} what is wrong with the shape of the part's section."""

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        """The part's lines of the printed summary."""
        return []


# -- the parts ---------------------------------------------------------------


class Throughput(Part):
    """Raw, ds4tw and the peer, prompt by prompt (L{ds4tw.bench._throughput})."""

    key = "ds4tw"

    @staticmethod
    def stacks(doc: Mapping[str, Any]) -> dict[str, Any]:
        stacks = {
            "ds4tw": doc.get("ds4tw"),
            "peer": (doc.get("peer") or {}).get("fixed"),
            "peer_natural": (doc.get("peer") or {}).get("natural"),
        }
        if doc.get("baseline") is not None:
            # --baseline: another ds4tw tree, the A/B of two versions.
            stacks["baseline"] = doc["baseline"]
        return stacks

    def ratios(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """
        Every stack against raw. The headline numbers are paired: the median
        over prompts of (stack / raw) for rates and (stack - raw) for TTFT,
        each pair measured moments apart on the same prompt. The ratios of
        medians (C{*_of_medians}) are kept beside them as a cross-check.
        """
        raw = doc.get("raw")
        out: dict[str, Any] = {}
        stacks = self.stacks(doc)
        for name, section in stacks.items():
            for key, paired_key in (
                ("decode_tps", "decode_ratio"),
                ("prefill_tps", "prefill_ratio"),
            ):
                label = f"{name}_{key.split('_')[0]}"
                of_medians = ratio(median(section, key), median(raw, key))
                paired = _paired(section, paired_key)
                out[label] = paired if paired is not None else of_medians
                out[label + "_of_medians"] = of_medians
            for key in ("ttft_short", "ttft_long"):
                a, b = median(section, key + "_s"), median(raw, key + "_s")
                of_medians = None if a is None or b is None else (a - b) * 1e3
                paired = _paired(section, key + "_diff_ms")
                out[f"{name}_{key}_overhead_ms"] = paired if paired is not None else of_medians
                out[f"{name}_{key}_overhead_ms_of_medians"] = of_medians
        for name, section in stacks.items():
            out[f"{name}_steady_decode"] = _paired(section, "steady_decode_ratio")
        out["ds4tw_over_peer_decode"] = ratio(
            median(doc.get("ds4tw"), "decode_tps"), median(stacks["peer"], "decode_tps")
        )
        if "baseline" in stacks:
            # Both paired against the same raw trials, interleaved: the
            # ratio of the two is this version's decode over the baseline's.
            out["ds4tw_over_baseline_decode"] = ratio(out["ds4tw_decode"], out["baseline_decode"])
        return out

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        r = doc.get("ratios") or {}
        return [
            target(
                "ds4tw decode throughput / raw",
                r.get("ds4tw_decode"),
                DECODE_RATIO_TARGET if r.get("ds4tw_decode") is not None else None,
                "ratio",
                False,
                "client-seen SSE tok/s over raw in-process tok/s (medians)",
            ),
            target(
                "ds4tw TTFT overhead over raw (short prompt)",
                r.get("ds4tw_ttft_short_overhead_ms"),
                TTFT_OVERHEAD_TARGET_MS
                if r.get("ds4tw_ttft_short_overhead_ms") is not None
                else None,
                "ms",
                True,
                "median client TTFT minus median raw TTFT (tokenization included in both)",
            ),
        ]

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        stacks = {"raw": doc["raw"], "ds4tw": doc["ds4tw"]}
        if doc["peer"] is not None:
            stacks["peer.fixed"] = doc["peer"].get("fixed")
        for name, section in stacks.items():
            if section is None:
                continue
            for key in ("decode_tps", "ttft_short_s", "ttft_long_s", "prefill_tps"):
                check_summary(f"{name}.{key}", section.get(key), errors)
        if doc["raw"] is None and not doc["notes"]:
            errors.append("notes: raw was skipped without a note saying why")

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        raw, ds, peer = doc.get("raw"), doc.get("ds4tw"), (doc.get("peer") or {}).get("fixed")
        natural = (doc.get("peer") or {}).get("natural")
        r = doc.get("ratios") or {}
        lines = [
            f"{'median':<28}{'raw':>10}{'ds4tw':>10}{'peer':>10}{'ds4tw/raw':>11}{'peer/raw':>10}",
        ]

        def row(label: str, key: str, scale: float, spec: str, rel: str) -> None:
            vals = [median(s, key) for s in (raw, ds, peer)]
            rels = [r.get(f"{name}_{rel}") for name in ("ds4tw", "peer")]
            rel_spec = ".3f" if "overhead" not in rel else "+.1f"
            lines.append(
                f"{label:<28}"
                + "".join(f"{fmt(v, spec, scale):>10}" for v in vals)
                + f"{fmt(rels[0], rel_spec):>11}{fmt(rels[1], rel_spec):>10}"
            )

        row("decode tok/s", "decode_tps", 1, ".1f", "decode")
        row("decode tok/s, steady", "steady_tps", 1, ".1f", "steady_decode")
        row("prefill tok/s (prompt/TTFT)", "prefill_tps", 1, ".0f", "prefill")
        row("TTFT short ms (+ms)", "ttft_short_s", 1e3, ".1f", "ttft_short_overhead_ms")
        row("TTFT long ms (+ms)", "ttft_long_s", 1e3, ".1f", "ttft_long_overhead_ms")

        def cpu(label: str, key: str) -> None:
            vals = [((sec or {}).get("cpu_per_token") or {}).get(key) for sec in (raw, ds, peer)]
            if any(v is not None for v in vals):
                lines.append(f"{label:<28}" + "".join(f"{fmt(v, '.3f'):>10}" for v in vals))

        cpu("CPU ms/token, main thread", "main_ms")
        cpu("CPU ms/token, all threads", "total_ms")
        cpu("CPU ms/token, bench client", "client_ms")
        base = doc.get("baseline")
        if base:
            lines.append(
                f"{'baseline decode tok/s':<28}{'':>10}{fmt(median(base, 'decode_tps')):>10}"
                f"{'':>10}{fmt(r.get('baseline_decode'), '.3f'):>11}"
                f"   this/baseline {fmt(r.get('ds4tw_over_baseline_decode'), '.3f')}"
                f" ({base.get('source')})"
            )
        if natural:
            lines.append(
                f"{'peer decode, no logit_bias':<28}{'':>10}{'':>10}"
                f"{fmt(median(natural, 'decode_tps')):>10}{'':>11}"
                f"{fmt(r.get('peer_natural_decode'), '.3f'):>10}"
            )
        lines.append(
            "(ratios and +ms: medians of per-prompt pairs, each pair measured back to back)"
        )
        return lines


class Cancel(Part):
    """The cancel latency (L{ds4tw.bench._cancel})."""

    key = "cancel"
    #: The median cancel latency inside a step, whatever the batch or
    #: token time (llama.cpp checks the abort flag between graph nodes).
    PREFILL_MEDIAN_MS = 20.0
    DECODE_MEDIAN_MS = 5.0

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        cancel = self.section(doc) or {}
        decode = cancel.get("decode") or {}
        prefill = cancel.get("prefill") or {}
        return [
            target(
                "cancel latency in decode, in token times (max)",
                (decode.get("latency_in_units") or {}).get("max"),
                1.0 if decode else None,
                "tokens",
                True,
                "ds4tw's logged latency over the stream's own token interval just before the "
                "hang-up",
            ),
            target(
                "cancel latency in prefill, in prefill batches (max)",
                (prefill.get("latency_in_units") or {}).get("max"),
                1.0 if prefill else None,
                "batches",
                True,
                "ds4tw's logged latency over the slowest full batch of a raw prefill of the same "
                "prompt run just before (scripted: the fixed batch time)",
            ),
            target(
                "median cancel latency in decode",
                (decode.get("latency_ms") or {}).get("median"),
                self.DECODE_MEDIAN_MS if decode else None,
                "ms",
                True,
                "in-step abort: the abort flag stops a decode step between graph nodes",
            ),
            target(
                "median cancel latency in prefill",
                (prefill.get("latency_ms") or {}).get("median"),
                self.PREFILL_MEDIAN_MS if prefill else None,
                "ms",
                True,
                "in-step abort: the abort flag stops a prefill batch between graph nodes",
            ),
        ]

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        cancel = self.section(doc)
        if cancel is None:
            return
        for stage in ("decode", "prefill"):
            part = cancel.get(stage)
            if not isinstance(part, dict):
                errors.append(f"cancel.{stage}: missing")
                continue
            check_summary(f"cancel.{stage}.latency_ms", part.get("latency_ms"), errors)
            if not isinstance(part.get("trials"), list):
                errors.append(f"cancel.{stage}.trials: not a list")

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        cancel = self.section(doc) or {}
        if not cancel:
            return []
        lines = [""]
        for stage, unit, key in (
            ("decode", "token", "token_time_ms"),
            ("prefill", "batch", "batch_time_ms"),
        ):
            part = cancel.get(stage) or {}
            lat, ref = part.get("latency_ms") or {}, part.get(key) or {}
            units = part.get("latency_in_units") or {}
            lines.append(
                f"cancel in {stage + ':':<9} latency median {fmt(lat.get('median'), '.2f')} ms, "
                f"max {fmt(lat.get('max'), '.2f')} ms (n={lat.get('n')}); one {unit} "
                f"{fmt(ref.get('median'), '.1f')} ms median; max {fmt(units.get('max'), '.2f')} "
                f"{'tokens' if unit == 'token' else 'batches'}"
            )
        return lines


class AbortCheck(Part):
    """The abort callback's cost to decode (L{ds4tw.bench._abort})."""

    key = "abort_check"

    def ratios(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        return {"abort_callback_decode": (self.section(doc) or {}).get("ratio")}

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        r = doc.get("ratios") or {}
        return [
            target(
                "decode with the abort callback / without",
                r.get("abort_callback_decode"),
                DECODE_RATIO_TARGET if r.get("abort_callback_decode") is not None else None,
                "ratio",
                False,
                "in-process LlamaEngine, a busy Python thread beside, median of paired ratios",
            )
        ]


class Keepalive(Part):
    """The keepalive gaps (L{ds4tw.bench._keepalive})."""

    key = "keepalive"

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        ka = self.section(doc) or {}
        return [
            target(
                "longest keepalive gap (queued, prefill, silent decode)",
                ka.get("max_gap_s"),
                ka.get("limit_s"),
                "s",
                True,
                "every byte-arrival gap on the probe streams; limit K + 0.1 s",
            )
        ]

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        ka = self.section(doc)
        if ka is None:
            return
        check_summary("keepalive.gaps_s", ka.get("gaps_s"), errors)
        for key in ("keepalive_s", "limit_s"):
            if not isinstance(ka.get(key), _NUM):
                errors.append(f"keepalive.{key}: not a number")
        if not isinstance(ka.get("probes"), list):
            errors.append("keepalive.probes: not a list")

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        ka = self.section(doc) or {}
        if not ka:
            return []
        return [
            f"keepalive K={ka.get('keepalive_s')} s: longest gap {fmt(ka.get('max_gap_s'), '.3f')}"
            f" s (limit {fmt(ka.get('limit_s'), '.2f')} s); silent decode verified: "
            f"{fmt(ka.get('silent_decode_verified'))}; stages seen: "
            f"{fmt(ka.get('all_stages_seen'))}"
        ]


class ManyClients(Part):
    """Many clients waiting behind one job (L{ds4tw.bench._many})."""

    key = "many_clients"

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        many = self.section(doc) or {}
        return [
            target(
                "longest silence of a waiting client",
                (many.get("max_queued_gap_s") or {}).get("max"),
                many.get("limit_s"),
                "s",
                True,
                f"{many.get('clients')} clients queued behind one job; limit K + 0.1 s",
            )
        ]

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        many = self.section(doc)
        if many is None:
            return
        for key in ("clients", "outcomes", "rss_per_waiting_client_bytes", "max_queued_gap_s"):
            if key not in many:
                errors.append(f"many_clients.{key}: missing")
        outcomes = many.get("outcomes") or {}
        if set(outcomes) != {"completed", "cancelled", "error"}:
            errors.append("many_clients.outcomes: expected completed, cancelled, error")
        elif sum(outcomes.values()) != many.get("clients"):
            errors.append("many_clients.outcomes: do not add up to the number of clients")

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        many = self.section(doc) or {}
        if not many:
            return []
        o = many.get("outcomes") or {}
        per = many.get("rss_per_waiting_client_bytes")
        return [
            f"{many.get('clients')} waiting clients: completed {o.get('completed')}, "
            f"cancelled {o.get('cancelled')}, errors {o.get('error')}; longest silence "
            f"{fmt((many.get('max_queued_gap_s') or {}).get('max'), '.3f')} s; "
            f"RSS/connection {fmt(per, '.1f', 1 / 1024)} KiB; accounted: "
            f"{fmt(many.get('all_accounted'))}"
        ]


class Constrained(Part):
    """Grammar-constrained decode over unconstrained (L{ds4tw.bench._constrained})."""

    key = "constrained"
    #: Constrained decode over unconstrained decode, same prompts.
    RATIO_TARGET = 0.90
    KINDS = (
        ("json_schema", "JSON schema"),
        ("tool_call", "forced tool call"),
        ("tool_auto", "tool_choice auto, lazy grammar"),
    )

    def ratios(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        constrained = self.section(doc)
        if not constrained:
            return {}
        return {
            f"constrained_{name}_decode": median(constrained, f"{name}_ratio")
            for name, _ in self.KINDS
        }

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        if not self.section(doc):
            return []
        r = doc.get("ratios") or {}
        return [
            target(
                f"constrained decode / unconstrained ({label})",
                r.get(f"constrained_{name}_decode"),
                self.RATIO_TARGET,
                "ratio",
                False,
                "in-process LlamaEngine, greedy, median of per-prompt ratios",
            )
            for name, label in self.KINDS
        ]

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        constrained = self.section(doc)
        if constrained is None:
            return
        if not isinstance(constrained, dict):
            errors.append("constrained: not an object")
            return
        for name in ("unconstrained", "json_schema", "tool_call"):
            check_summary(
                f"constrained.{name}.decode_tps",
                (constrained.get(name) or {}).get("decode_tps"),
                errors,
            )
        for key in ("json_schema_ratio", "tool_call_ratio"):
            check_summary(f"constrained.{key}", constrained.get(key), errors)
        check_summary(
            "constrained.tool_call.args_first_byte_s",
            (constrained.get("tool_call") or {}).get("args_first_byte_s"),
            errors,
        )

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        con = self.section(doc) or {}
        if not con:
            return []
        return [
            "",
            f"constrained decode ({con.get('where')}, {con.get('prompts')} prompts): "
            f"unconstrained {fmt(median(con.get('unconstrained'), 'decode_tps'))} tok/s, "
            f"JSON schema {fmt(median(con.get('json_schema'), 'decode_tps'))} tok/s "
            f"(x{fmt(median(con, 'json_schema_ratio'), '.3f')}), forced tool call "
            f"{fmt(median(con.get('tool_call'), 'decode_tps'))} tok/s "
            f"(x{fmt(median(con, 'tool_call_ratio'), '.3f')}), auto (lazy) "
            f"{fmt(median(con.get('tool_auto'), 'decode_tps'))} tok/s "
            f"(x{fmt(median(con, 'tool_auto_ratio'), '.3f')}); steady-rate ratios "
            f"x{fmt(median(con, 'json_schema_steady_ratio'), '.3f')}, "
            f"x{fmt(median(con, 'tool_call_steady_ratio'), '.3f')}; first argument byte "
            f"{fmt(median(con.get('tool_call'), 'args_first_byte_s'), '.1f', 1e3)} ms "
            "from the prompt text",
        ]


class Batching(Part):
    """Continuous batching (L{ds4tw.bench._batching})."""

    key = "batching"
    #: Aggregate decode at four streams over one; a short request's TTFT
    #: beside a long decode within its own prefill plus this many steps;
    #: the worst gap of a stream while another prefills, in steps of that
    #: prefill; reactor CPU per token at four streams over one.
    AGGREGATE_AT_4_TARGET = 1.4
    TTFT_STEPS_TARGET = 2.0
    GAP_STEPS_TARGET = 1.5
    REACTOR_CPU_TARGET = 1.0

    def ratios(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """
        The headline numbers: ds4tw's aggregate at N streams over one
        and over raw batched at N (median of paired trials), raw's own
        scaling, the single stream over raw, the TTFT excess in steps, the
        worst gap in prefill steps per --batch, the reactor CPU ratio.
        """
        b = self.section(doc)
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
        out["batching_ttft_excess_steps"] = median(b.get("ttft"), "excess_steps")
        for batch, g in (b.get("gap") or {}).items():
            out[f"batching_gap_{batch}_steps"] = median(g, "worst_over_prefill_step")
        out["batching_reactor_cpu_4_over_1"] = (b.get("cpu") or {}).get("ratio_4_to_1")
        return out

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Continuous batching's targets (none when the batching part did not run)."""
        b = doc.get("batching")
        if not b:
            return []
        r = self.ratios(doc)
        four = (b.get("ds4tw") or {}).get("4") or {}
        every = [e for e in (b.get("ds4tw") or {}).values() if isinstance(e, dict)]
        whole = sum(int(e.get("streams_whole") or 0) for e in every)
        total = sum(int(e.get("streams_total") or 0) for e in every)
        par = b.get("parallel")
        gaps = [
            target(
                f"worst token gap while another request prefills, --batch {batch}",
                r.get(f"batching_gap_{batch}_steps"),
                self.GAP_STEPS_TARGET,
                "steps",
                True,
                f"a decoding stream's longest gap during a {fmt(median(g, 'prompt_tokens'), '.0f')}"
                "-token prefill over the mean time of a prefill step (/metrics); one step, with "
                "room for jitter",
            )
            for batch, g in (b.get("gap") or {}).items()
        ]
        return [
            target(
                "aggregate decode, 4 streams / 1 stream",
                r.get("batching_ds4tw_4_over_1"),
                self.AGGREGATE_AT_4_TARGET,
                "ratio",
                False,
                f"ds4tw --parallel {par}, medians over rounds; "
                f"{four.get('streams_whole')}/{four.get('streams_total')} streams whole at 4",
            ),
            target(
                "every batched stream whole",
                whole / total if total else None,
                1.0 if total else None,
                "fraction",
                False,
                f"{whole}/{total} streams got max_tokens tokens with finish_reason length",
            ),
            target(
                "short request TTFT beside a long decode, steps over its TTFT alone",
                r.get("batching_ttft_excess_steps"),
                self.TTFT_STEPS_TARGET,
                "steps",
                True,
                "median over trials of (TTFT beside - median TTFT idle) / mean step time "
                "(/metrics)",
            ),
            target(
                f"single-stream decode at --parallel {par} / raw single sequence",
                r.get("batching_single_over_raw"),
                DECODE_RATIO_TARGET if r.get("batching_single_over_raw") is not None else None,
                "ratio",
                False,
                "paired with the raw batch loop (llama_decode, same 8-sequence context)",
            ),
            *gaps,
            target(
                "reactor CPU per token, 4 streams / 1 stream",
                r.get("batching_reactor_cpu_4_over_1"),
                self.REACTOR_CPU_TARGET,
                "ratio",
                True,
                "twistd main thread (schedstat ns) per streamed token; one hand-off per step",
            ),
        ]

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        b = self.section(doc)
        if b is None:
            return
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
                check_summary(
                    f"batching.{name}.{n}.aggregate_tps", entry.get("aggregate_tps"), errors
                )
        ttft = b.get("ttft")
        if not isinstance(ttft, dict):
            errors.append("batching.ttft: missing")
        else:
            for key in ("alone_ttft_s", "busy_ttft_s", "excess_steps"):
                check_summary(f"batching.ttft.{key}", ttft.get(key), errors)
        gap = b.get("gap")
        if not isinstance(gap, dict) or not gap:
            errors.append("batching.gap: missing")
        else:
            for batch, g in gap.items():
                for key in ("worst_gap_s", "median_gap_before_s", "prefill_step_s", "prefill_s"):
                    check_summary(f"batching.gap.{batch}.{key}", (g or {}).get(key), errors)

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        """The batching part's lines of the printed summary (none when it did not run)."""
        b = self.section(doc)
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
                f"{n:<10}{fmt(median(w, 'aggregate_tps')):>10}{fmt(w.get('ratio_to_1'), '.2f'):>7}"
                f"{fmt(median(d, 'aggregate_tps')):>13}{fmt(d.get('ratio_to_1'), '.2f'):>7}"
                f"{fmt(median(d, 'vs_raw'), '.3f'):>8}{fmt(median(d, 'per_stream_tps')):>12}"
                f"{str(d.get('streams_whole')) + '/' + str(d.get('streams_total')):>8}"
                f"{fmt(median(d, 'mean_batch_size'), '.1f'):>7}"
                f"{fmt((cpu.get(str(n)) or {}).get('main_ms_per_token'), '.3f'):>16}"
                f"{fmt(noisiest(d, w), '.2f'):>7}"
            )
        lines.append("(noise: the most cores other processes used during one of that row's trials)")
        single = b.get("single_stream") or {}
        lines.append(
            f"single stream / raw: {fmt(single.get('ds4tw_over_raw'), '.3f')} (paired, --parallel "
            f"{b.get('parallel')}); throughput part: "
            f"{fmt(single.get('throughput_part_ratio'), '.3f')}"
        )
        t = b.get("ttft") or {}
        if t:
            lines.append(
                f"short TTFT: idle {fmt(median(t, 'alone_ttft_s'), '.1f', 1e3)} ms, beside a long "
                f"decode {fmt(median(t, 'busy_ttft_s'), '.1f', 1e3)} ms (max "
                f"{fmt((t.get('busy_ttft_s') or {}).get('max'), '.1f', 1e3)}); step "
                f"{fmt((t.get('steps') or {}).get('mean_step_s'), '.1f', 1e3)} ms; excess "
                f"{fmt(median(t, 'excess_steps'), '.2f')} steps median, "
                f"{fmt((t.get('excess_steps') or {}).get('max'), '.2f')} max; overlapped "
                f"{t.get('overlapped')}/{t.get('trials')}"
            )
        for batch, g in (b.get("gap") or {}).items():
            lines.append(
                f"gap, --batch {batch}: worst {fmt(median(g, 'worst_gap_s'), '.1f', 1e3)} ms vs "
                f"median before {fmt(median(g, 'median_gap_before_s'), '.1f', 1e3)} ms, prefill "
                f"step {fmt(median(g, 'prefill_step_s'), '.1f', 1e3)} ms "
                f"({fmt(median(g, 'worst_over_prefill_step'), '.2f')} steps); prefill of "
                f"{fmt(median(g, 'prompt_tokens'), '.0f')} tokens "
                f"{fmt(median(g, 'prefill_s'), '.2f')} s"
            )
        if cpu:
            lines.append(
                f"reactor CPU/token 4 streams / 1: {fmt(cpu.get('ratio_4_to_1'), '.3f')} "
                "(schedstat), "
                f"{fmt(cpu.get('ratio_4_to_1_ticks'), '.3f')} (stat ticks)"
            )
        for note in b.get("notes") or []:
            lines.append(f"batching note: {note}")
        return lines


class Fairness(Part):
    """The prefill order's aging under a flood (L{ds4tw.bench._fairness})."""

    key = "prefill_fairness"
    #: The long prompt's steps under a flood of short prompts over the most
    #: the aging allows (L{ds4tw.bench._fairness.bound_steps}).
    BOUND_TARGET = 1.0

    def ratios(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """
        The prefill fairness part's headline numbers: the long prompt's TTFT
        under the flood, with and without aging, over its TTFT alone (without
        aging a lower bound: the flood was stopped), and the short prompts'
        median TTFT with aging over without.
        """
        f = self.section(doc)
        if not f:
            return {}
        r = f.get("ratios") or {}
        return {
            "fairness_aging_over_alone": r.get("aging_over_alone"),
            "fairness_no_aging_over_alone": r.get("no_aging_over_alone"),
            "fairness_short_aging_over_no_aging": r.get("short_aging_over_no_aging"),
        }

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The prefill aging's bound, in steps (none when the fairness part did not run)."""
        f = doc.get("prefill_fairness")
        if not f:
            return []
        aging, bound = f.get("aging") or {}, f.get("bound_steps")
        sz = f.get("sizes") or {}
        return [
            target(
                "long prompt's prefill steps under a flood of short prompts / the aging bound",
                ratio(aging.get("steps"), bound),
                self.BOUND_TARGET,
                "ratio",
                True,
                f"{aging.get('steps')} steps, bound {bound} = "
                f"(AGING_STEPS {f.get('aging_steps')} + 1)"
                f" x {sz.get('long_tokens')}-token prompt's {sz.get('batch')}-token chunks; "
                "machine-independent",
            )
        ]

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        f = self.section(doc)
        if f is None:
            return
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
            check_summary("prefill_fairness.alone.long_ttft_s", alone.get("long_ttft_s"), errors)
        for name in ("aging", "no_aging"):
            v = f.get(name)
            if not isinstance(v, dict):
                errors.append(f"prefill_fairness.{name}: missing")
                continue
            for key in ("long_ttft_s", "steps", "led"):
                if not isinstance(v.get(key), _NUM):
                    errors.append(f"prefill_fairness.{name}.{key}: not a number")
            check_summary(f"prefill_fairness.{name}.short_ttft_s", v.get("short_ttft_s"), errors)
        if not isinstance(f.get("bound_steps"), int):
            errors.append("prefill_fairness.bound_steps: not an integer")

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        """The prefill fairness part's lines of the printed summary (none when it did not run)."""
        f = self.section(doc)
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
            f"{'alone':<18}{fmt(median(alone, 'long_ttft_s'), '.2f'):>12}"
            f"{fmt(1.0 if median(alone, 'long_ttft_s') else None, '.2f'):>9}"
            f"{'/'.join(str(n) for n in alone.get('steps') or []):>7}"
            f"{'/'.join(str(n) for n in alone.get('led') or []):>5}{'-':>8}{'-':>15}{'-':>9}"
            f"{fmt((alone.get('foreign_cores') or {}).get('max'), '.2f'):>7}",
        ]
        for name, label in (("aging", "flood, aging"), ("no_aging", "flood, no aging")):
            v = f.get(name) or {}
            capped = "+" if v.get("capped") else ""
            lines.append(
                f"{label:<18}{fmt(v.get('long_ttft_s'), '.2f') + capped:>12}"
                f"{fmt(v.get('over_alone'), '.2f') + capped:>9}{v.get('steps', '-'):>7}"
                f"{v.get('led', '-'):>5}{v.get('shorts_done', '-'):>8}"
                f"{fmt(median(v, 'short_ttft_s'), '.0f', 1e3):>15}"
                f"{fmt(median(v, 'short_ttft_steps'), '.0f'):>9}"
                f"{fmt(v.get('foreign_cores'), '.2f'):>7}"
            )
        off = f.get("no_aging") or {}
        if off.get("capped"):
            lines.append(
                "(+: a lower bound; without aging the flood was stopped after "
                f"{off.get('cap_steps')} "
                f"steps, when the long prompt had prefilled {off.get('long_prefilled_at_cap')}/"
                f"{sz.get('long_tokens')} tokens)"
            )
        r = f.get("ratios") or {}
        lines.append(
            f"aging bound {f.get('bound_steps')} steps, within: {fmt(f.get('within_bound'))}; "
            f"shorts' median TTFT with aging / without: "
            f"{fmt(r.get('short_aging_over_no_aging'), '.2f')}; largest reused prefix "
            f"{f.get('cached_tokens_max')} tokens; noise: cores other processes used"
        )
        for note in f.get("notes") or []:
            lines.append(f"fairness note: {note}")
        return lines


class Cache(Part):
    """The prompt cache (L{ds4tw.bench._cache})."""

    key = "cache"
    #: The next turn's TTFT from the prompt cache's memory and from its
    #: disk (after a restart) over a cold turn's, and the share of an
    #: interleaved conversation's turns that reuse the whole previous prompt.
    RAM_TARGET = 0.10
    DISK_TARGET = 0.25
    HIT_RATE_TARGET = 0.90

    def ratios(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """
        The headline numbers: each tier's median TTFT over the median
        cold TTFT, the interleaved hit rates (cache on and off) and prefill
        time on over off.
        """
        c = self.section(doc)
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

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The prompt cache's targets (none when the cache part did not run)."""
        c = doc.get("cache")
        if not c:
            return []
        r = self.ratios(doc)
        tiers = c.get("tiers") or {}
        prefix = fmt(median(tiers, "prompt_tokens"), ".0f")
        proven = [p for got in (tiers.get("proven") or {}).values() for p in got]
        on = (c.get("interleaved") or {}).get("on") or {}
        return [
            target(
                "next turn's TTFT from the prompt cache's memory / cold",
                r.get("cache_ram_over_cold"),
                self.RAM_TARGET,
                "ratio",
                True,
                f"medians; a {prefix}-token prompt, its slot taken by {c.get('parallel')} other "
                "conversations",
            ),
            target(
                "next turn's TTFT from disk after a restart / cold",
                r.get("cache_disk_over_cold"),
                self.DISK_TARGET,
                "ratio",
                True,
                f"medians; a {prefix}-token prompt, same --kv-disk-dir, files out of the page "
                "cache",
            ),
            target(
                "interleaved conversations' hit rate",
                r.get("cache_hit_rate_on"),
                self.HIT_RATE_TARGET,
                "fraction",
                False,
                f"{on.get('hits')}/{on.get('turns')} turns after the first reused the previous "
                f"prompt whole; {c.get('sizes', {}).get('conversations')} conversations on "
                f"--parallel {c.get('parallel')}",
            ),
            target(
                "every tier's turn proven by /metrics",
                sum(proven) / len(proven) if proven else None,
                1.0 if proven else None,
                "fraction",
                False,
                f"{sum(proven)}/{len(proven)} turns: one hit counted from the tier measured "
                "(cold: none of substance), the previous prompt reused whole",
            ),
        ]

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        c = self.section(doc)
        if c is None:
            return
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
                check_summary(
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

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        """The cache part's lines of the printed summary (none when it did not run)."""
        c = self.section(doc)
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
                f"{'n':>4}{'noise':>7}  (prompt "
                f"{fmt(median(tiers, 'prompt_tokens'), '.0f')} tokens)"
            )
            for tier in ("cold", "slot", "ram", "disk"):
                r = ratios.get(tier) or {}
                flags = proven.get(tier) or []
                lines.append(
                    f"{tier:<10}{fmt(median(ttft, tier), '.1f', 1e3):>10}"
                    f"{fmt(1.0 if tier == 'cold' and flags else r.get('over_cold'), '.3f'):>8}"
                    f"{fmt(median(r, 'paired_over_cold'), '.3f'):>8}"
                    f"{fmt(median(cached, tier), '.0f'):>8}"
                    f"{str(sum(flags)) + '/' + str(len(flags)):>8}"
                    f"{(ttft.get(tier) or {}).get('n', 0):>4}"
                    f"{fmt((noise.get(tier) or {}).get('max'), '.2f'):>7}"
                )
            shutdown = tiers.get("shutdown") or {}
            disk = shutdown.get("disk") or {}
            lines.append(
                f"restart: shutdown {fmt(shutdown.get('s'), '.2f')} s (exit "
                f"{shutdown.get('exit_code')}), {disk.get('files')} files "
                f"{fmt(disk.get('bytes'), '.1f', 2**-20)} MiB on disk; ready again in "
                f"{fmt((tiers.get('restart') or {}).get('ready_s'), '.2f')} s"
            )
            lines.append(
                "(noise: the most cores other processes used during one of that row's turns)"
            )
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
                    f"{fmt(side.get('hit_rate'), '.2f'):>7}{fmt(side.get('token_rate'), '.2f'):>8}"
                    f"{fmt(side.get('prefill_s'), '.2f'):>11}"
                    f"{fmt(side.get('prefill_later_s'), '.2f'):>9}"
                    f"{fmt(side.get('ttft_s'), '.2f'):>8}"
                )
            answers = inter.get("answers") or {}
            lines.append(
                f"  prefill on/off {fmt(inter.get('prefill_on_over_off'), '.3f')} (turns after the "
                f"first {fmt(inter.get('prefill_later_on_over_off'), '.3f')}); answers on the same "
                f"prompt identical {answers.get('identical')}/{answers.get('compared')}; noise "
                f"{fmt((inter.get('foreign_cores') or {}).get('max'), '.2f')} cores at most"
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


class Models(Part):
    """Several models in one server (L{ds4tw.bench._models})."""

    key = "models"
    #: Peak RSS over the nothing-loaded RSS and the budget, at most (MiB).
    MARGIN_MB = _models.MARGIN_MB
    #: Two models decoding at once over one alone (aggregate tok/s), at least.
    TWO_MODELS_TARGET = _models.TWO_MODELS_TARGET

    def ratios(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """
        The headline numbers: TTFT of a cold, evicting and reloading model
        over a warm one's (medians); the RSS margin over the budget (MiB);
        the aggregate decode tok/s of two streams on one model and of one
        stream on each of two models over one stream's.
        """
        m = self.section(doc)
        if not m:
            return {}
        load = (m.get("load") or {}).get("ratios") or {}
        budget = m.get("budget") or {}
        dec = (m.get("decode") or {}).get("ratios") or {}
        margin = budget.get("margin_bytes")
        return {
            "models_cold_over_warm": load.get("cold_over_warm"),
            "models_evict_over_warm": load.get("evict_over_warm"),
            "models_reload_over_warm": load.get("reload_over_warm"),
            "models_rss_margin_mb": None if margin is None else margin / 2**20,
            "models_batched_over_one": dec.get("batched_over_one"),
            "models_two_models_over_one": dec.get("two_models_over_one"),
        }

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The models part's targets (none when it did not run)."""
        m = self.section(doc)
        if not m:
            return []
        r = self.ratios(doc)
        load, budget, dec = m.get("load") or {}, m.get("budget") or {}, m.get("decode") or {}
        flags = [f for got in (load.get("proven") or {}).values() for f in got]
        two = dec.get("two_models") or {}
        return [
            target(
                "every cold, warm, evicting and reloading request proven by /metrics",
                sum(flags) / len(flags) if flags else None,
                1.0 if flags else None,
                "fraction",
                False,
                f"{sum(flags)}/{len(flags)} requests: the loads and the LRU victim their role "
                "says, nothing else, and the stream whole",
            ),
            target(
                "peak RSS - nothing-loaded RSS - budget, over a mix of three models",
                r.get("models_rss_margin_mb"),
                self.MARGIN_MB if budget else None,
                "MiB",
                True,
                f"budget {fmt(budget.get('budget_bytes'), '.0f', 2**-20)} MiB fits two of three; "
                f"peak {fmt(budget.get('peak_rss_bytes'), '.0f', 2**-20)} MiB (VmHWM), nothing "
                f"loaded {fmt(median(budget, 'baseline_rss_bytes'), '.0f', 2**-20)} MiB",
            ),
            target(
                "streams of the three-model mix whole",
                ratio(budget.get("whole"), budget.get("requests")) if budget else None,
                1.0 if budget else None,
                "fraction",
                False,
                f"{budget.get('whole')}/{budget.get('requests')} whole, "
                f"{budget.get('answered')} answered, {budget.get('clients')} clients",
            ),
            target(
                "two models decoding at once / one model alone (aggregate tok/s)",
                r.get("models_two_models_over_one"),
                self.TWO_MODELS_TARGET if dec else None,
                "ratio",
                False,
                "medians; one stream on each of two models, taking turns on the one model "
                f"thread (paired {fmt(median(two, 'paired_over_one'), '.3f')})",
            ),
        ]

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        m = self.section(doc)
        if m is None:
            return
        if not isinstance(m, dict):
            errors.append("models: not an object")
            return
        for key in ("source", "where"):
            if not isinstance(m.get(key), str):
                errors.append(f"models.{key}: missing")
        if not isinstance(m.get("budget_mb"), int):
            errors.append("models.budget_mb: not an integer")
        if m.get("load") is None and m.get("budget") is None and m.get("decode") is None:
            errors.append("models: neither load, budget nor decode")
        load = m.get("load")
        if load is not None:
            for role in _models.ROLES:
                check_summary(
                    f"models.load.ttft_s.{role}", (load.get("ttft_s") or {}).get(role), errors
                )
            if not isinstance(load.get("proven"), dict):
                errors.append("models.load.proven: missing")
        budget = m.get("budget")
        if budget is not None:
            check_summary(
                "models.budget.baseline_rss_bytes", budget.get("baseline_rss_bytes"), errors
            )
            for key in ("peak_rss_bytes", "requests", "answered", "whole"):
                if not isinstance(budget.get(key), _NUM):
                    errors.append(f"models.budget.{key}: not a number")
        dec = m.get("decode")
        if dec is not None:
            for cfg in _models.CONFIGS:
                entry = dec.get(cfg)
                if not isinstance(entry, dict):
                    errors.append(f"models.decode.{cfg}: missing")
                    continue
                check_summary(
                    f"models.decode.{cfg}.aggregate_tps", entry.get("aggregate_tps"), errors
                )

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        """The models part's lines of the printed summary (none when it did not run)."""
        m = self.section(doc)
        if not m:
            return []
        mib = 2**-20
        ctx = "/".join(str(c) for c in (m.get("ctx") or {}).values())
        lines = [
            "",
            f"models: {', '.join(m.get('names') or [])} (one file, ctx {ctx}, --parallel "
            f"{m.get('parallel')}), budget {m.get('budget_mb')} MiB (fits two: estimated "
            f"{fmt((m.get('budget_fits_two') or {}).get('estimated'))}, measured "
            f"{fmt((m.get('budget_fits_two') or {}).get('measured'))})",
        ]
        load = m.get("load") or {}
        if load:
            ttft, load_s = load.get("ttft_s") or {}, load.get("load_s") or {}
            rest, proven = load.get("rest_s") or {}, load.get("proven") or {}
            cached = load.get("cached_tokens") or {}
            ratios, paired = load.get("ratios") or {}, load.get("paired_over_warm") or {}
            lines.append(
                f"{'first token':<14}{'TTFT ms':>9}{'/warm':>8}{'paired':>8}{'load ms':>9}"
                f"{'rest ms':>9}{'cached':>8}{'proven':>8}{'n':>4}"
            )
            for role in _models.ROLES:
                flags = proven.get(role) or []
                over = ratios.get(f"{role}_over_warm")
                if role == "warm":
                    over = 1.0 if median(ttft, "warm") is not None else None
                lines.append(
                    f"{role:<14}{fmt(median(ttft, role), '.1f', 1e3):>9}{fmt(over, '.2f'):>8}"
                    f"{fmt(median(paired, role), '.2f'):>8}"
                    f"{fmt(median(load_s, role), '.1f', 1e3):>9}"
                    f"{fmt(median(rest, role), '.1f', 1e3):>9}"
                    f"{fmt(median(cached, role), '.0f'):>8}"
                    f"{str(sum(flags)) + '/' + str(len(flags)):>8}"
                    f"{(ttft.get(role) or {}).get('n', 0):>4}"
                )
            sizes = load.get("measured_memory_bytes") or {}
            lines.append(
                "(cold: never loaded, room free; evict: never loaded, the LRU model unloaded "
                "first; reload: loaded before, evicting; rest = TTFT - load; cached: prompt "
                "tokens reused from a slot) measured MiB: "
                + ", ".join(f"{k} {fmt(v, '.0f', mib)}" for k, v in sizes.items())
            )
        budget = m.get("budget") or {}
        if budget:
            lines.append(
                f"budget: {budget.get('requests')} requests, {budget.get('clients')} clients: "
                f"answered {budget.get('answered')}, whole {budget.get('whole')}; RSS nothing "
                f"loaded {fmt(median(budget, 'baseline_rss_bytes'), '.0f', mib)} MiB, peak "
                f"{fmt(budget.get('peak_rss_bytes'), '.0f', mib)} MiB (+"
                f"{fmt(budget.get('peak_over_baseline_bytes'), '.0f', mib)} against a budget of "
                f"{fmt(budget.get('budget_bytes'), '.0f', mib)}: margin "
                f"{fmt(budget.get('margin_bytes'), '+.0f', mib)} MiB); server's count at most "
                f"{fmt(budget.get('used_bytes_max'), '.0f', mib)} MiB, models loaded at most "
                f"{budget.get('loaded_max')} (loading, loaded or unloading: "
                f"{budget.get('in_memory_max')})"
            )
            for error in budget.get("errors") or []:
                lines.append(f"  mix error: {error}")
        dec = m.get("decode") or {}
        if dec:
            lines.append(
                f"{'decode (' + str(dec.get('decode_tokens')) + ' tokens)':<26}{'agg tok/s':>10}"
                f"{'/one':>7}{'paired':>8}{'per stream':>11}{'whole':>7}{'noise':>7}"
            )
            labels = {
                "one": "one model, 1 stream",
                "batched": "one model, 2 streams",
                "two_models": "two models, 1 each",
            }
            one = median(dec.get("one"), "aggregate_tps")
            for cfg in _models.CONFIGS:
                e = dec.get(cfg) or {}
                lines.append(
                    f"{labels[cfg]:<26}{fmt(median(e, 'aggregate_tps')):>10}"
                    f"{fmt(ratio(median(e, 'aggregate_tps'), one), '.3f'):>7}"
                    f"{fmt(median(e, 'paired_over_one'), '.3f'):>8}"
                    f"{fmt(median(e, 'per_stream_tps')):>11}"
                    f"{str(e.get('streams_whole')) + '/' + str(e.get('streams_total')):>7}"
                    f"{fmt((e.get('foreign_cores') or {}).get('max'), '.2f'):>7}"
                )
        for note in m.get("notes") or []:
            lines.append(f"models note: {note}")
        for error in m.get("errors") or []:
            lines.append(f"models error: {error.splitlines()[0] if error else error}")
        return lines


class Parsers(Part):
    """Every tool-call syntax's splitting and grammar cost (L{ds4tw.bench._parsers})."""

    key = "parsers"

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        section = self.section(doc)
        return ["", *_parsers.table(section)] if section else []


class Dialects(Part):
    """The four dialects on one server, against chat completions (L{ds4tw.bench._dialects})."""

    key = "dialects"

    def ratios(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """
        Every dialect against the baseline: the median over rounds of the
        paired ratio (TTFT, client and server decode rate, wire bytes per
        token), the TTFT's paired difference (ms), and the reactor CPU per
        token over the baseline's.
        """
        section = self.section(doc)
        if not section:
            return {}
        out: dict[str, Any] = {}
        for d, entry in (section.get("vs_baseline") or {}).items():
            for key, label in (
                ("ttft_s", "ttft"),
                ("ttft_diff_ms", "ttft_diff_ms"),
                ("decode_tps", "decode"),
                ("server_decode_tps", "server_decode"),
                ("wire_bytes_per_token", "wire_bytes_per_token"),
            ):
                out[f"dialects_{d}_{label}"] = median(entry, key)
            out[f"dialects_{d}_reactor_cpu"] = entry.get("reactor_ms_per_token")
        return out

    def targets(self, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Not speeds: that the comparison compared like with like, every stream whole."""
        section = self.section(doc)
        if not section:
            return []
        same = section.get("same_answer") or {}
        per = section.get("per_dialect") or {}
        trials = sum(int(e.get("trials") or 0) for e in per.values())
        whole = sum(int(e.get("whole") or 0) for e in per.values())
        return [
            target(
                "the same greedy answer through the four dialects",
                ratio(same.get("same_text"), same.get("compared")),
                1.0 if same.get("compared") else None,
                "fraction",
                False,
                f"{same.get('same_text')}/{same.get('compared')} rounds the same text, "
                f"{same.get('same_tokens')} the same token count",
            ),
            target(
                "dialect streams whole",
                ratio(whole, trials),
                1.0 if trials else None,
                "fraction",
                False,
                f"{whole}/{trials}: 200, no error, the final frame, text, tokens counted",
            ),
        ]

    def validate(self, doc: Mapping[str, Any], errors: list[str]) -> None:
        section = self.section(doc)
        if section is None:
            return
        if not isinstance(section, dict):
            errors.append("dialects: not an object")
            return
        per, vs = section.get("per_dialect"), section.get("vs_baseline")
        if not isinstance(per, dict) or not isinstance(vs, dict):
            errors.append("dialects: per_dialect or vs_baseline missing")
            return
        for d in _dialects.DIALECTS:
            entry = per.get(d)
            if not isinstance(entry, dict):
                errors.append(f"dialects.per_dialect.{d}: missing")
                continue
            for key in ("ttft_s", "decode_tps", "wire_bytes_per_token"):
                check_summary(f"dialects.per_dialect.{d}.{key}", entry.get(key), errors)
            if d == _dialects.BASELINE:
                continue
            pair = vs.get(d)
            if not isinstance(pair, dict):
                errors.append(f"dialects.vs_baseline.{d}: missing")
                continue
            for key in ("ttft_s", "ttft_diff_ms", "decode_tps", "wire_bytes_per_token"):
                check_summary(f"dialects.vs_baseline.{d}.{key}", pair.get(key), errors)
        if not isinstance(section.get("rounds"), list):
            errors.append("dialects.rounds: not a list")

    def table(self, doc: Mapping[str, Any]) -> list[str]:
        section = self.section(doc)
        if not section:
            return []
        per, vs = section.get("per_dialect") or {}, section.get("vs_baseline") or {}
        sz = section.get("sizes") or {}
        base = section.get("baseline")

        def iqr(entry: Mapping[str, Any] | None, spec: str) -> str:
            e = entry or {}
            return f"[{fmt(e.get('p25'), spec)}, {fmt(e.get('p75'), spec)}]"

        lines = [
            "",
            f"dialects: {sz.get('rounds')} rounds x {sz.get('max_tokens')} tokens, greedy, "
            f"interleaved on one server; /{base}: median of the rounds' paired ratios "
            "[quartiles]",
            f"{'dialect':<10}{'TTFT ms':>8}{'/' + str(base):>7}{'':>15}{'+ms':>7}"
            f"{'tok/s':>8}{'/' + str(base):>7}{'':>15}{'server':>8}{'/' + str(base):>7}"
            f"{'whole':>7}",
        ]
        for d in _dialects.DIALECTS:
            e, p = per.get(d) or {}, vs.get(d) or {}
            one = d == base
            lines.append(
                f"{d:<10}{fmt(median(e, 'ttft_s'), '.1f', 1e3):>8}"
                f"{fmt(1.0 if one else median(p, 'ttft_s'), '.3f'):>7}"
                f"{'' if one else iqr(p.get('ttft_s'), '.3f'):>15}"
                f"{fmt(0.0 if one else median(p, 'ttft_diff_ms'), '+.2f'):>7}"
                f"{fmt(median(e, 'decode_tps')):>8}"
                f"{fmt(1.0 if one else median(p, 'decode_tps'), '.3f'):>7}"
                f"{'' if one else iqr(p.get('decode_tps'), '.3f'):>15}"
                f"{fmt(median(e, 'server_decode_tps')):>8}"
                f"{fmt(1.0 if one else median(p, 'server_decode_tps'), '.3f'):>7}"
                f"{str(e.get('whole')) + '/' + str(e.get('trials')):>7}"
            )
        lines.append(
            f"{'dialect':<10}{'wire B/tok':>11}{'/' + str(base):>7}{'body B/tok':>11}"
            f"{'B/frame':>9}{'other B':>9}{'reactor ms/tok':>15}{'/' + str(base):>7}"
        )
        for d in _dialects.DIALECTS:
            e, p = per.get(d) or {}, vs.get(d) or {}
            one = d == base
            cpu = e.get("cpu_per_token") or {}
            lines.append(
                f"{d:<10}{fmt(median(e, 'wire_bytes_per_token')):>11}"
                f"{fmt(1.0 if one else median(p, 'wire_bytes_per_token'), '.3f'):>7}"
                f"{fmt(median(e, 'body_bytes_per_token')):>11}"
                f"{fmt(median(e, 'content_frame_bytes'), '.0f'):>9}"
                f"{fmt(median(e, 'other_body_bytes'), '.0f'):>9}"
                f"{fmt(cpu.get('main_ms'), '.3f'):>15}"
                f"{fmt(1.0 if one else p.get('reactor_ms_per_token'), '.3f'):>7}"
            )
        same = section.get("same_answer") or {}
        ollama = per.get("ollama") or {}
        lines.append(
            f"same answer in all four: {same.get('same_text')}/{same.get('compared')} rounds; "
            f"ollama's own eval_count/eval_duration {fmt(median(ollama, 'eval_tps'))} tok/s; "
            f"noise {fmt((section.get('foreign_cores') or {}).get('max'), '.2f')} cores at most"
        )
        return lines


class Grammars(Part):
    """
    Real agents' grammar build times (L{ds4tw.bench._grammars}): the
    section is the record; the part has no targets and no summary lines.
    """

    key = "grammars"


#: Every part, in the order of the ratios, the targets and the summary.
PARTS: tuple[Part, ...] = (
    Throughput(),
    Cancel(),
    AbortCheck(),
    Keepalive(),
    ManyClients(),
    Constrained(),
    Batching(),
    Fairness(),
    Cache(),
    Models(),
    Dialects(),
    Parsers(),
    Grammars(),
)
