"""
The CI smoke run of the benchmark: C{ds4tw-bench --quick --engine
scripted} end to end (real subprocess servers on real ports, real SSE,
the real log and metrics), checking that it exits 0 and writes a valid
JSON document and a PNG chart.

No speed is asserted: the scripted engine's pace is fixed and the machine
is shared. What is asserted is that every part produced its numbers and
that the qualitative facts hold (the silent decode really was silent,
every waiting client is accounted for).

Caveat: raw llama-cpp-python, the peer server and the batching part's
raw batched baseline are skipped on the scripted engine (the JSON says
so); the full run on the demo model is what exercises them
(docs/performance.md). The batching part itself runs, on C{twistd ds4tw
--parallel 8 --model scripted:...}, and so does the prompt cache part, on
C{twistd ds4tw --parallel 2 --model scripted:...} (a restore is instant
there, so its ratios say nothing of the real cache's speed; that every
turn came from the tier it claims, and the hit rates, they do).

The models part needs GGUF files (a models file serves files only), so
it has its own quick run on the demo model: every load and eviction
proven by /metrics, every stream of the mix whole, never more models in
memory than the budget fits, and no load during a decode trial. Its
speeds and its RSS margin are reported, not asserted.

The dialects part (C{--only dialects}) has a quick run of its own on the
scripted engine (about 10 s): the four dialects' streams whole, the same
answer through each, every ratio against chat completions there. Its
speeds are reported, not asserted; the frames' sizes are the dialects'
own, so Ollama's NDJSON costs fewer bytes a token than chat's SSE.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ds4tw import demo_model_path
from ds4tw.bench._report import validate

#: The whole quick scripted run takes about 30 s; this bounds a hang.
TIMEOUT_S = 240


def bench_command() -> list[str]:
    """The console script when installed beside this Python (it proves the entry point)."""
    script = Path(sys.executable).parent / "ds4tw-bench"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ds4tw.bench"]


def test_quick_scripted_run_writes_valid_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [*bench_command(), "--quick", "--engine", "scripted", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "targets:" in proc.stdout

    doc = json.loads((out / "bench.json").read_text())
    assert validate(doc) == []
    assert doc["errors"] == []
    assert doc["engine"] == "scripted"
    assert doc["raw"] is None and doc["peer"] is None
    assert any("skipped" in note for note in doc["notes"])

    assert doc["ds4tw"]["decode_tps"]["n"] == doc["settings"]["decode_trials"]
    assert doc["ds4tw"]["errors"] == []
    assert doc["cancel"]["decode"]["latency_ms"]["n"] >= 1
    assert doc["cancel"]["prefill"]["latency_ms"]["n"] >= 1
    ka = doc["keepalive"]
    assert ka["silent_decode_verified"] and ka["all_stages_seen"]
    many = doc["many_clients"]
    assert many["clients"] == doc["settings"]["clients"]
    assert many["outcomes"]["error"] == 0 and many["all_accounted"]
    assert many["rss_per_waiting_client_bytes"] is not None
    batching = doc["batching"]
    assert batching["raw"] is None
    for n in batching["streams"]:
        entry = batching["ds4tw"][str(n)]
        assert entry["all_whole"], entry
        assert entry["streams_whole"] == entry["streams_total"] == n * batching["rounds"]
        assert entry["aggregate_tps"]["n"] == batching["rounds"]
    assert batching["ttft"]["short_whole"] and batching["ttft"]["excess_steps"]["n"] >= 1
    assert all(g["worst_gap_s"]["n"] >= 1 for g in batching["gap"].values())
    cache = doc["cache"]
    assert cache["errors"] == []
    tiers = cache["tiers"]
    for tier, proven in tiers["proven"].items():
        assert proven and all(proven), (tier, tiers["trials"][tier])
    assert tiers["shutdown"]["exit_code"] == 0
    inter = cache["interleaved"]
    assert inter["on"]["hit_rate"] == 1.0 and inter["off"]["hit_rate"] == 0.0
    answers = inter["answers"]
    assert answers["identical"] == answers["compared"] > 0, answers["divergences"]
    assert inter["prefill_on_over_off"] < 1.0

    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every server the run started was stopped.
    for log in (out / "logs").glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log


def check_models_run(doc: dict[str, Any]) -> None:
    """What a quick models run must show, whatever the machine's speed."""
    assert validate(doc) == []
    assert doc["errors"] == [], doc["errors"]
    models = doc["models"]
    assert models["budget_fits_two"] == {"estimated": True, "measured": True}
    load = models["load"]
    for role, flags in load["proven"].items():
        assert flags and all(flags), (role, load["trials"])
    # The cold and evicting TTFTs include a load; a warm one does not.
    for role in ("cold", "evict", "reload"):
        assert load["ttft_s"][role]["min"] > load["ttft_s"]["warm"]["median"], role
    budget = models["budget"]
    assert budget["requests"] == budget["answered"] == budget["whole"] > 0, budget["errors"]
    assert budget["loaded_max"] == 2
    assert budget["peak_rss_bytes"] > budget["baseline_rss_bytes"]["median"]
    decode = models["decode"]
    for cfg in ("one", "batched", "two_models"):
        entry = decode[cfg]
        assert entry["streams_whole"] == entry["streams_total"] > 0, (cfg, entry["errors"])
        assert entry["loads_during"] == 0, cfg
        assert entry["aggregate_tps"]["n"] == len(decode["rounds"]), cfg


@pytest.mark.skipif(demo_model_path() is None, reason="the demo model is not installed")
def test_quick_models_run_on_the_demo_model(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [*bench_command(), "--only", "models", "--quick", "--threads", "2", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "two models, 1 each" in proc.stdout
    check_models_run(json.loads((out / "bench.json").read_text()))
    for log in (out / "logs").glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log


def test_quick_dialects_run_on_the_scripted_engine(tmp_path: Path) -> None:
    out = tmp_path / "results"
    command = ["--only", "dialects", "--quick", "--engine", "scripted", "--out", str(out)]
    proc = subprocess.run(
        [*bench_command(), *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "same answer in all four" in proc.stdout
    doc = json.loads((out / "bench.json").read_text())
    assert validate(doc) == []
    assert doc["errors"] == [], doc["errors"]
    section = doc["dialects"]
    rounds = section["sizes"]["rounds"]
    for name, entry in section["per_dialect"].items():
        assert entry["whole"] == entry["trials"] == rounds, (name, entry["errors"])
        assert entry["ttft_s"]["n"] == entry["decode_tps"]["n"] == rounds, name
    same = section["same_answer"]
    assert same["same_text"] == same["same_tokens"] == same["compared"] == rounds, same
    # Every turn after the prime found its prompt in the slot.
    for r in section["rounds"]:
        for name, t in r.items():
            assert t["server_cached"] >= t["server_prompt"] - 2, (name, t)
    assert set(section["vs_baseline"]) == {"responses", "messages", "ollama"}
    assert doc["ratios"]["dialects_ollama_wire_bytes_per_token"] < 1.0
    for log in (out / "logs").glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log
