"""
The benchmark's models part (ds4tw.bench._models) without a model: the
models file it writes (read by ds4tw's own loader), the budget that fits
two of three, the load trials' roles and the victims least recent use
predicts, the request mix, the /metrics and log parsing (on what a fleet
of scripted engines really renders and logs, so a format change there
fails here), and the part's ratios, targets, summary lines and schema.

Caveat: these prove the arithmetic, the parsing and the plan; that the
real server loads, evicts and holds its RSS as measured is what the
quick run on the demo model checks (tests/integration/test_bench_smoke.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from ds4tw import Model, Server, ServerConfig
from ds4tw._runtime.modelset import load_models_file
from ds4tw.bench import _models, _parts, _report, _stats
from ds4tw.bench.__main__ import parse
from ds4tw.testing import HTTPHarness, ScriptedEngine, SteppedThreads

from .test_bench import synthetic_doc

MIB = 2**20


def test_only_models_is_an_option_for_the_real_model_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse(["--only", "models"]).only == "models"
    with pytest.raises(SystemExit):
        parse(["--only", "models", "--engine", "scripted"])
    assert "GGUF files only" in capsys.readouterr().err


def test_sizes_quick_and_full() -> None:
    from ds4tw.bench._settings import make_settings

    quick, full = (_models.sizes(make_settings(quick=q)) for q in (True, False))
    assert quick.load_trials >= 2 and quick.decode_rounds >= 2
    assert full.mix_requests == 30 and full.decode_tokens == 200
    # Every prompt and answer fits the smallest model's context.
    assert full.prompt_words * 2 + full.decode_tokens < min(_models.CTX)


def test_the_models_file_serves_one_file_under_three_names(tmp_path: Path) -> None:
    model = tmp_path / 'a model "file".gguf'
    model.write_bytes(b"GGUF")
    path = tmp_path / "models.toml"
    path.write_text(_models.models_file(str(model)))
    specs = list(load_models_file(str(path)))
    assert [s.name for s in specs] == list(_models.NAMES)
    assert [s.ctx for s in specs] == list(_models.CTX)
    assert {s.parallel for s in specs} == {_models.PARALLEL}
    assert {str(s.path) for s in specs} == {str(model)}


def test_the_budget_fits_any_two_and_not_three() -> None:
    sizes = [190 * MIB, 213 * MIB, 235 * MIB]
    budget = _models.budget_mb(sizes)
    assert budget == 543  # 213 + 235 + 190 / 2
    assert _models.fits_two(budget * MIB, sizes)
    # Measured a little above the estimates: still two.
    assert _models.fits_two(budget * MIB, [s + 10 * MIB for s in sizes])
    assert not _models.fits_two(budget * MIB, [s + 60 * MIB for s in sizes])
    assert not _models.fits_two(700 * MIB, sizes)


@pytest.mark.parametrize("trial", range(6))
def test_load_plans_match_what_least_recent_use_does(trial: int) -> None:
    plan = _models.load_plan(trial)
    victims = _models.expected_victims(plan)
    roles = [role for role, _ in plan]
    assert roles.count("cold") == 2 and roles.count("evict") == 1 and roles.count("reload") == 1
    assert roles.count("warm") == 4
    evict = roles.index("evict")
    reload = roles.index("reload")
    # The evicted model comes back, evicting the other one.
    assert plan[reload][1] == victims[evict]
    assert victims[reload] not in (None, victims[evict], plan[evict][1])
    assert [v for r, v in zip(roles, victims, strict=True) if r in ("cold", "warm")] == [None] * 6


def test_load_plans_rotate_the_names_and_alternate_the_order() -> None:
    assert {_models.load_plan(k)[0][1] for k in range(3)} == set(_models.NAMES)
    assert {_models.expected_victims(_models.load_plan(k))[5] for k in range(2)} == {
        _models.load_plan(0)[2][1],
        _models.load_plan(1)[0][1],
    }
    with pytest.raises(ValueError, match="would be warm, not cold"):
        _models.expected_victims([("cold", "a"), ("cold", "a")])


def test_the_mix_asks_each_name_as_often_in_a_seeded_order() -> None:
    a, b = _models.mix_plan(30, 1234), _models.mix_plan(30, 1234)
    assert a == b and a != _models.mix_plan(30, 99)
    assert {n: a.count(n) for n in _models.NAMES} == {n: 10 for n in _models.NAMES}
    assert a != sorted(a)


def test_status_and_health_parsing() -> None:
    text = "Name:\tpython\nVmHWM:\t  218128 kB\nVmRSS:\t   13492 kB\nRssAnon:\t 6868 kB\n"
    assert _models.parse_status(text + "RssFile:\t    6624 kB\n") == {
        "VmHWM": 218128 * 1024,
        "VmRSS": 13492 * 1024,
        "RssAnon": 6868 * 1024,
        "RssFile": 6624 * 1024,
    }
    states = ["ready", "loading", "unloaded", "unloading"]
    health = {"models": [{"state": s} for s in states]}
    assert _models.in_memory(health) == 3 and _models.in_memory(health, ("ready",)) == 1


def test_a_whole_stream_has_its_final_frame_text_and_every_token() -> None:
    good = {"status": 200, "error": None, "done": True, "finish_reason": "length"}
    good |= {"text": "Hi there", "tokens": 4}
    assert _models.stream_whole(good, 4)
    for key, value in [
        ("status", 503),
        ("error", "timed out"),
        ("done", False),
        ("finish_reason", None),
        ("text", ""),
        ("tokens", 3),
    ]:
        assert not _models.stream_whole({**good, key: value}, 4), key


def _settle(threads: SteppedThreads) -> None:
    for _ in range(100):
        if threads.called:
            threads.release_calls()
        elif threads.busy:
            threads.run_until_idle()
        else:
            return
    raise AssertionError("never settled")


def test_metrics_and_log_lines_of_a_fleet_read_back() -> None:
    """
    Two scripted models that do not both fit: the second request loads b
    and evicts a. The part's parsers read what the server really renders
    and logs.
    """
    engines = [
        ScriptedEngine(("Reply.",), model_id=name, memory_mb=mb, load_steps=2, tps=0)
        for name, mb in (("a", 40), ("b", 30))
    ]
    threads = SteppedThreads()
    threads.hold_calls = True
    clock = Clock()
    server = Server(
        models=[Model(e) for e in engines],
        config=ServerConfig(keepalive=2.0),
        memory_budget=50 * MIB,
        clock=clock,
        threads=threads,
    )
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        server.startService()
        http = HTTPHarness(server.resource(), clock)

        def chat(model: str) -> Any:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            return http.post("/v1/chat/completions", {**body, "stream": True})

        def metrics() -> dict[str, Any]:
            return _models.parse_model_metrics(http.get("/metrics").body.decode())

        m0 = metrics()
        chat("a")
        _settle(threads)
        m1 = metrics()
        chat("b")
        _settle(threads)
        m2 = metrics()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert m0["loads"] == {"a": 0, "b": 0} and m0["budget_bytes"] == 50 * MIB
    assert m2["loaded"] == {"a": 0, "b": 1} and m2["memory_bytes"]["b"] == 30 * MIB
    assert m2["evicted"] == {"a": 1, "b": 0} and m2["idle"] == {"a": 0, "b": 0}
    assert set(m2["load_s"]) == {"a", "b"}
    first, second = _models.load_delta(m0, m1), _models.load_delta(m1, m2)
    assert first == {"loads": {"a": 1}, "evicted": {}, "idle": {}}
    assert second == {"loads": {"b": 1}, "evicted": {"a": 1}, "idle": {}}
    assert _models.proven("cold", "a", None, first)
    assert _models.proven("evict", "b", "a", second)
    assert not _models.proven("cold", "b", None, second)  # it evicted
    assert not _models.proven("evict", "b", "c", second)  # not the predicted victim
    assert not _models.proven("warm", "b", None, second)
    assert _models.proven("warm", "b", None, _models.load_delta(m2, m2))
    events = _models.parse_load_lines("\n".join(lines))
    assert [(e["event"], e["model"]) for e in events] == [
        ("loaded", "a"),
        ("evicted", "a"),
        ("loaded", "b"),
    ]
    assert events[0]["total_mib"] == 40 and events[1] == {
        "event": "evicted",
        "model": "a",
        "for": "b",
        "mib": 40.0,
    }


def _request(trial: int, role: str, ttft: float, load: float | None = None) -> dict[str, Any]:
    return {"trial": trial, "role": role, "ttft_s": ttft, "load_s": load, "proven": True}


def test_role_summary_ratios_over_warm_medians_and_each_trial_s_own() -> None:
    requests = [
        _request(0, "warm", 0.06),
        _request(0, "warm", 0.08),
        _request(0, "cold", 0.7, 0.5),
        _request(0, "evict", 0.9, 0.6),
        _request(0, "reload", 0.8, 0.55),
        _request(1, "warm", 0.10),
        _request(1, "cold", 1.0, 0.8),
        _request(1, "evict", None, None),
    ]
    got = _models.role_summary(requests)
    assert got["ttft_s"]["warm"]["median"] == pytest.approx(0.08)
    assert got["ratios"]["cold_over_warm"] == pytest.approx(0.85 / 0.08)
    assert got["ratios"]["evict_over_warm"] == pytest.approx(0.9 / 0.08)
    assert got["paired_over_warm"]["cold"]["values"] == pytest.approx([0.7 / 0.07, 1.0 / 0.1])
    assert got["rest_s"]["cold"]["values"] == pytest.approx([0.2, 0.2])
    assert got["load_s"]["evict"]["n"] == 1 and "warm" not in got["load_s"]
    assert got["proven"]["evict"] == [True, True]


def test_decode_summary_pairs_each_round_with_its_one_stream_trial() -> None:
    def t(agg: float | None, per: list[float], whole: list[bool]) -> dict[str, Any]:
        return {"aggregate_tps": agg, "per_stream_tps": per, "whole": whole, "loads": {}}

    rounds = [
        {
            "one": t(100.0, [100.0], [True]),
            "batched": t(150.0, [75.0, 75.0], [True, True]),
            "two_models": t(96.0, [48.0, 48.0], [True, True]),
        },
        {
            "one": t(90.0, [90.0], [True]),
            "batched": t(144.0, [72.0, 72.0], [True, False]),
            "two_models": t(90.0, [45.0, 45.0], [True, True]),
        },
    ]
    got = _models.decode_summary(rounds)
    assert got["ratios"]["batched_over_one"] == pytest.approx(147.0 / 95.0)
    assert got["ratios"]["two_models_over_one"] == pytest.approx(93.0 / 95.0)
    assert got["ratios"]["two_models_per_stream_over_one"] == pytest.approx(46.5 / 95.0)
    assert got["two_models"]["paired_over_one"]["values"] == pytest.approx([0.96, 1.0])
    assert (got["batched"]["streams_whole"], got["batched"]["streams_total"]) == (3, 4)


def models_section() -> dict[str, Any]:
    """A models section in the shape L{_models.measure} writes."""
    requests = [
        _request(0, "warm", 0.07),
        _request(0, "cold", 0.56, 0.4),
        _request(0, "evict", 0.63, 0.45),
        _request(0, "reload", 0.6, 0.42),
    ]
    requests[2]["proven"] = False
    rounds = [
        {
            "one": {"aggregate_tps": 100.0, "per_stream_tps": [100.0], "whole": [True]},
            "batched": {"aggregate_tps": 150.0, "per_stream_tps": [75.0] * 2, "whole": [True] * 2},
            "two_models": {
                "aggregate_tps": 95.0,
                "per_stream_tps": [47.5] * 2,
                "whole": [True] * 2,
            },
        }
    ]
    return {
        "names": list(_models.NAMES),
        "ctx": dict(zip(_models.NAMES, _models.CTX, strict=True)),
        "parallel": 2,
        "source": "test",
        "where": "test",
        "budget_mb": 543,
        "budget_fits_two": {"estimated": True, "measured": True},
        "notes": [],
        "errors": [],
        "load": {**_models.role_summary(requests), "measured_memory_bytes": {"bench-a": 2**28}},
        "budget": {
            "budget_bytes": 543 * MIB,
            "baseline_rss_bytes": _stats.summary([150.0 * MIB]),
            "peak_rss_bytes": 700 * MIB,
            "peak_over_baseline_bytes": 550 * MIB,
            "margin_bytes": 7 * MIB,
            "used_bytes_max": 450 * MIB,
            "in_memory_max": 3,
            "loaded_max": 2,
            "requests": 30,
            "clients": 2,
            "answered": 30,
            "whole": 30,
            "errors": [],
        },
        "decode": {**_models.decode_summary(rounds), "decode_tokens": 200},
    }


def test_models_ratios_targets_table_and_chart(tmp_path: Path) -> None:
    doc = synthetic_doc()
    before = len(doc["targets"])
    doc["models"] = models_section()
    doc["ratios"] = _report.ratios(doc)
    doc["targets"] = _report.targets(doc)
    r = doc["ratios"]
    assert r["models_cold_over_warm"] == pytest.approx(8.0)
    assert r["models_evict_over_warm"] == pytest.approx(9.0)
    assert r["models_rss_margin_mb"] == pytest.approx(7.0)
    assert r["models_two_models_over_one"] == pytest.approx(0.95)
    assert r["models_batched_over_one"] == pytest.approx(1.5)
    met = {t["name"]: t["met"] for t in doc["targets"][before:]}
    assert met == {
        "every cold, warm, evicting and reloading request proven by /metrics": False,
        "peak RSS - nothing-loaded RSS - budget, over a mix of three models": True,
        "streams of the three-model mix whole": True,
        "two models decoding at once / one model alone (aggregate tok/s)": True,
    }
    assert _report.validate(doc) == []
    text = _report.table(doc)
    assert "budget 543 MiB (fits two: estimated yes, measured yes)" in text
    assert "margin +7 MiB" in text and "whole 30" in text and "models loaded at most 2" in text
    assert "two models, 1 each" in text and "0.950" in text
    assert "[MISS] every cold, warm, evicting and reloading request proven by /metrics" in text
    path = tmp_path / "bench.png"
    _report.chart(doc, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Over the margin, and a collapse: missed.
    doc["models"]["budget"]["margin_bytes"] = 100 * MIB
    doc["models"]["decode"]["ratios"]["two_models_over_one"] = 0.33
    met = {t["name"]: t["met"] for t in _report.targets(doc)[before:]}
    assert not met["peak RSS - nothing-loaded RSS - budget, over a mix of three models"]
    assert not met["two models decoding at once / one model alone (aggregate tok/s)"]


def test_no_models_section_no_models_targets() -> None:
    doc = synthetic_doc()
    assert not any(k.startswith("models_") for k in doc["ratios"])
    assert _parts.Models().targets(doc) == [] and _parts.Models().table({}) == []
    # One measurement alone: the others' targets are unknown, not failed.
    doc["models"] = {**models_section(), "load": None, "decode": None}
    met = {t["name"]: t["met"] for t in _parts.Models().targets(doc)}
    assert met["two models decoding at once / one model alone (aggregate tok/s)"] is None
    assert met["every cold, warm, evicting and reloading request proven by /metrics"] is None
    assert _report.validate({**doc, "targets": []}) == []


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda m: m.pop("where"), "models.where"),
        (lambda m: m.update(budget_mb="543"), "models.budget_mb"),
        (lambda m: m["load"]["ttft_s"].pop("evict"), "models.load.ttft_s.evict"),
        (lambda m: m["budget"].pop("peak_rss_bytes"), "models.budget.peak_rss_bytes"),
        (lambda m: m["decode"].pop("two_models"), "models.decode.two_models: missing"),
        (lambda m: m.update(load=None, budget=None, decode=None), "neither load"),
    ],
)
def test_validate_names_what_is_wrong_in_models(breakage: Any, expected: str) -> None:
    doc = synthetic_doc()
    doc["models"] = copy.deepcopy(models_section())
    breakage(doc["models"])
    problems = _report.validate(doc)
    assert any(expected in p for p in problems), problems
