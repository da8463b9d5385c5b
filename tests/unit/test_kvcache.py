"""
The prompt cache through the server, on the scripted engine (whose slot
"state" is its tokens, packed): memory beyond the slots, disk across a
restart, files rejected at start, the budget, a disconnect during a
restore, the usage fields of every dialect, /metrics and the log line.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ds4tw import PromptCache
from ds4tw._engine.kvcache import _file

from .conftest import Rig, make_rig
from .test_scheduler import answer, cached, chat, log_lines, metrics, next_turn, sample

IDENTITY = {"model": "scripted", "kv_bytes_per_token": 4}


def long_question(name: str) -> str:
    # Long enough to be saved (min_tokens below), distinct from the start.
    return f"Conversation {name}: " + f"tell me about {name}. " * 20


def cache_rig(
    tmp: Path | None = None, *, ram: int = 1 << 20, disk: int = 1 << 20, slots: int = 1, **kw: Any
) -> Rig:
    cache = PromptCache(ram_bytes=ram, disk_dir=tmp, disk_bytes=disk if tmp else 0, min_tokens=64)
    return make_rig(
        kw.pop("replies", ["Short answer."]),
        slots=slots,
        prefix_cache=True,
        prompt_cache=cache,
        **kw,
    )


def hits(rig: Rig, source: str) -> float:
    return sample(metrics(rig), f'ds4tw_prompt_cache_hits_total{{source="{source}"}}')


def test_alternating_more_conversations_than_slots_keeps_each_one_cached() -> None:
    rig = cache_rig(slots=1)
    first = {n: [{"role": "user", "content": long_question(n)}] for n in "ABC"}
    bodies = {n: chat(rig, m) for n, m in first.items()}
    with log_lines() as lines:
        for n, msgs in first.items():
            body = chat(rig, next_turn(msgs, bodies[n], "And then?"))
            # The whole first turn came back, from memory (the one slot
            # held another conversation each time).
            assert cached(body) >= bodies[n]["usage"]["prompt_tokens"]
    assert hits(rig, "ram") == 3
    assert sum("(from ram)" in line for line in lines) == 3
    restored = sample(metrics(rig), 'ds4tw_prompt_cache_restored_tokens_total{tier="ram"}')
    assert restored >= sum(b["usage"]["prompt_tokens"] for b in bodies.values())
    assert [tier for _, tier, _ in rig.engine.restores] == ["ram"] * 3


def test_without_the_memory_tier_the_one_slot_keeps_only_the_last_conversation() -> None:
    rig = cache_rig(slots=1, ram=0)
    a = [{"role": "user", "content": long_question("A")}]
    first = chat(rig, a)
    chat(rig, [{"role": "user", "content": long_question("B")}])
    again = chat(rig, next_turn(a, first, "And then?"))
    # What the template's header and "Conversation " share, no more.
    assert cached(again) < first["usage"]["prompt_tokens"] // 4
    assert rig.engine.restores == []


def test_reusing_only_the_chat_templates_opening_is_a_miss() -> None:
    """
    Every prompt starts with the template's opening: a new conversation in
    a slot that held another one reuses it, and that is not a cache hit
    (counted as one, every new conversation on a busy server was a hit).
    """
    rig = make_rig(["Short answer."], slots=1, prefix_cache=True)
    opening = len("<|im_start|>user\n")  # the scripted ChatML, one token a character
    assert rig.engine._prefixes.opening == opening
    chat(rig, [{"role": "user", "content": "Apples and pears, please."}])
    trains = [{"role": "user", "content": "Trains, then."}]
    body = chat(rig, trains)
    assert cached(body) == opening  # reused all the same: nothing is thrown away
    assert sample(metrics(rig), "ds4tw_prompt_cache_misses_total") == 2
    assert hits(rig, "slot") == 0
    # Its next turn reuses the conversation: a hit.
    chat(rig, next_turn(trains, body, "And boats?"))
    assert hits(rig, "slot") == 1
    assert sample(metrics(rig), "ds4tw_prompt_cache_misses_total") == 2


def test_each_dialect_reports_the_reused_tokens() -> None:
    rig = cache_rig(slots=1)
    system = "You are a careful assistant. " * 10
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    first = chat(rig, msgs)
    chat(rig, [{"role": "user", "content": long_question("B")}])
    more = next_turn(msgs, first, "More")
    anthropic = rig.http.post(
        "/v1/messages",
        {"model": "m", "max_tokens": 16, "system": system, "messages": more[1:]},
    )
    rig.threads.run_until_idle()
    usage = anthropic.json()["usage"]
    assert usage["cache_read_input_tokens"] >= first["usage"]["prompt_tokens"]
    chat(rig, [{"role": "user", "content": long_question("C")}])
    responses = rig.http.post(
        "/v1/responses", {"model": "m", "instructions": system, "input": more[1:]}
    )
    rig.threads.run_until_idle()
    details = responses.json()["usage"]["input_tokens_details"]
    assert details["cached_tokens"] >= first["usage"]["prompt_tokens"]
    assert hits(rig, "ram") >= 2


def test_claude_codes_billing_header_does_not_defeat_the_cache() -> None:
    rig = cache_rig(slots=1)
    system = "You are Claude Code. " * 20

    def turn(cch: str) -> Any:
        billing = (
            f"x-anthropic-billing-header: cc_version=2.1.117.48f; cc_entrypoint=cli; cch={cch};"
        )
        ex = rig.http.post(
            "/v1/messages",
            {
                "model": "m",
                "max_tokens": 16,
                "system": [{"type": "text", "text": billing}, {"type": "text", "text": system}],
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )
        rig.threads.run_until_idle()
        return ex.json()["usage"]

    first, second = turn("71fea"), turn("0aaa9")
    assert second["cache_read_input_tokens"] >= first["input_tokens"] - 1
    assert "billing" not in "".join(m["content"] for m in rig.engine.template_messages[-1][:1])


# -- disk ------------------------------------------------------------------------


def kv_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.kv"))


def test_a_restart_serves_the_next_turn_from_disk(tmp_path: Path) -> None:
    rig = cache_rig(tmp_path, slots=1, ram=0)
    a = [{"role": "user", "content": long_question("A")}]
    first = chat(rig, a)
    rig.server.stopService()  # the graceful path: the slots go to disk
    assert kv_files(tmp_path)
    again = cache_rig(tmp_path, slots=1, ram=0)
    with log_lines() as lines:
        body = chat(again, next_turn(a, first, "And then?"))
    assert cached(body) >= first["usage"]["prompt_tokens"]
    assert hits(again, "disk") == 1
    assert any("(from disk)" in line for line in lines)
    assert again.engine.restores[0][1] == "disk"


def test_a_long_cold_prefill_is_saved_at_once_and_a_short_one_never(tmp_path: Path) -> None:
    rig = cache_rig(tmp_path, slots=1)
    chat(rig, [{"role": "user", "content": "Hi"}])  # under min_tokens
    rig.engine.prompt_cache.close()  # type: ignore[union-attr]  # waits for the writer
    assert kv_files(tmp_path) == []
    rig = cache_rig(tmp_path, slots=1)
    body = chat(rig, [{"role": "user", "content": long_question("A")}])
    rig.engine.prompt_cache._writer.shutdown(wait=True)  # type: ignore[union-attr]
    (path,) = kv_files(tmp_path)
    head = _file.read_head(path, IDENTITY)
    assert len(head.tokens) == body["usage"]["prompt_tokens"]


def test_corrupt_and_foreign_files_are_removed_at_start_and_never_loaded(tmp_path: Path) -> None:
    a = [{"role": "user", "content": long_question("A")}]
    rig = cache_rig(tmp_path, slots=1, ram=0)
    first = chat(rig, a)
    rig.server.stopService()
    (good,) = kv_files(tmp_path)
    raw = bytearray(good.read_bytes())
    raw[-20] ^= 0xFF  # in the state: only its checksum can tell
    good.write_bytes(bytes(raw))
    foreign = _file.write(tmp_path, {"model": "another"}, [1, 2, 3], b"\0" * 12)
    garbage = tmp_path / ("0" * 32 + ".kv")
    garbage.write_bytes(b"not a cache file")
    rig = cache_rig(tmp_path, slots=1, ram=0)
    assert not foreign.path.exists() and not garbage.exists()
    text = metrics(rig)
    assert sample(text, 'ds4tw_prompt_cache_rejected_files_total{reason="foreign"}') == 1
    assert sample(text, 'ds4tw_prompt_cache_rejected_files_total{reason="corrupt"}') == 1
    # The damaged state passes the scan (its head is intact) and is
    # rejected when read, before anything is loaded: a full prefill.
    body = chat(rig, next_turn(a, first, "And then?"))
    assert cached(body) == 0
    assert rig.engine.restores == []
    assert not good.exists()
    assert sample(metrics(rig), 'ds4tw_prompt_cache_rejected_files_total{reason="corrupt"}') == 2


def test_the_memory_budget_is_never_exceeded() -> None:
    budget = 3000
    rig = cache_rig(slots=1, ram=budget)
    for n in "ABCDEFGH":
        chat(rig, [{"role": "user", "content": long_question(n)}])
        used = sample(metrics(rig), 'ds4tw_prompt_cache_bytes{tier="ram"}')
        assert 0 < used <= budget or n == "A"
    assert sample(metrics(rig), 'ds4tw_prompt_cache_evictions_total{tier="ram"}') > 0


def test_a_smaller_disk_budget_at_start_evicts_down_to_it(tmp_path: Path) -> None:
    rig = cache_rig(tmp_path, slots=1, ram=0)
    for n in "ABC":
        chat(rig, [{"role": "user", "content": long_question(n)}])
    rig.server.stopService()
    sizes = [f.stat().st_size for f in kv_files(tmp_path)]
    assert len(sizes) == 3
    budget = max(sizes) + min(sizes) // 2  # room for one file, not two
    rig = cache_rig(tmp_path, slots=1, ram=0, disk=budget)
    rig.engine.prompt_cache._writer.shutdown(wait=True)  # type: ignore[union-attr]  # the unlinks
    left = kv_files(tmp_path)
    assert len(left) == 1 and left[0].stat().st_size <= budget
    assert sample(metrics(rig), 'ds4tw_prompt_cache_evictions_total{tier="disk"}') == 2
    assert sample(metrics(rig), 'ds4tw_prompt_cache_bytes{tier="disk"}') <= budget


def test_an_unwritable_directory_logs_and_serving_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*a: Any, **k: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_file.os, "fsync", full)
    rig = cache_rig(tmp_path, slots=1)
    with log_lines() as lines:
        body = chat(rig, [{"role": "user", "content": long_question("A")}])
        rig.engine.prompt_cache._writer.shutdown(wait=True)  # type: ignore[union-attr]
    assert answer(body) == "Short answer."
    assert any("No space left on device" in line for line in lines)
    assert kv_files(tmp_path) == [] and not list(tmp_path.glob("*.tmp"))
    assert sample(metrics(rig), "ds4tw_prompt_cache_write_errors_total") == 1


# -- a disconnect during a restore -----------------------------------------------


@pytest.fixture
def slow_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Disk reads wait for the event (or their cancel), like a slow disk."""
    go = threading.Event()
    real = _file.read_state
    stopped: list[bool] = []

    def slow(head: _file.Head, cancelled: Callable[[], bool] = lambda: False) -> bytearray:
        while not go.wait(0.001):
            if cancelled():
                stopped.append(True)
                raise _file.Cancelled
        return real(head, cancelled)

    monkeypatch.setattr(_file, "read_state", slow)
    go.stopped = stopped  # type: ignore[attr-defined]
    yield go
    go.set()


def test_a_disconnect_during_a_restore_stops_it(tmp_path: Path, slow_disk: Any) -> None:
    a = [{"role": "user", "content": long_question("A")}]
    rig = cache_rig(tmp_path, slots=1, ram=0, keepalive=5.0)
    first = chat(rig, a)
    rig.server.stopService()
    rig = cache_rig(tmp_path, slots=1, ram=0, keepalive=5.0)
    msgs = next_turn(a, first, "And then?")
    ex = rig.http.post("/v1/chat/completions", {"model": "m", "messages": msgs, "stream": True})
    for _ in range(5):
        rig.threads.step()  # the sequence waits for its state, computing nothing
    assert not [c for c in rig.engine.computed if c[0] == "prefill"]
    rig.clock.advance(5.0)
    assert b": prefill" in ex.body  # the wait is not silent
    ex.disconnect()
    rig.threads.run_until_idle()
    # The read itself stops (in the reader thread, within a chunk).
    for _ in range(1000):
        if slow_disk.stopped:
            break
        time.sleep(0.001)
    assert slow_disk.stopped
    assert rig.engine.restores == []
    assert not [c for c in rig.engine.computed if c[0] == "prefill"]
    text = metrics(rig)
    assert sample(text, 'ds4tw_cancelled_jobs_total{stage="prefill"}') == 1
    assert sample(text, 'ds4tw_prompt_cache_restored_tokens_total{tier="disk"}') == 0
    # The file is still good: the next request restores it.
    slow_disk.set()
    body = chat(rig, msgs)
    assert cached(body) >= first["usage"]["prompt_tokens"]


def test_a_cancelled_prefill_is_never_saved_as_complete(tmp_path: Path) -> None:
    rig = cache_rig(tmp_path, slots=1, n_batch=16)
    ex = rig.stream(long_question("A"))
    for _ in range(3):
        rig.threads.step()
    ex.disconnect()
    rig.threads.run_until_idle()
    rig.server.stopService()
    # What was computed may be kept, as exactly what it is: a prefix.
    for path in kv_files(tmp_path):
        head = _file.read_head(path, IDENTITY)
        assert len(head.tokens) <= 3 * 16
        assert list(head.tokens) == rig.engine.calls[0][0][: len(head.tokens)]
    assert re.search(r"closed", str(rig.engine.computed))
