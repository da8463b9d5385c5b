"""
Several models in one twistd (docs/models.md), end to end: a models file
with two models that do not both fit the memory budget (the demo model
under two names, each loaded as its own copy), Claude Code's two model
names through the official anthropic SDK, and every stream whole while
the server swaps the models in and out.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from ds4tw._engine.llama import demo_model_path

from .conftest import Twistd, start_twistd, stop_twistd

MIB = 2**20
#: Fits either model (about 170 and 240 MiB measured: weights 94, KV, compute
#: buffers; no prompt cache) but not both.
BUDGET_MB = 320

MODELS = """
[models.coder]
path = "{path}"
aliases = ["claude-sonnet-*", "claude-opus-*"]
ctx = 2048
parallel = 2

[models.small]
path = "{path}"
aliases = ["claude-haiku-*", "haiku"]
ctx = 1024
parallel = 1
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    tmp = tmp_path_factory.mktemp("models")
    models = tmp / "models.toml"
    models.write_text(MODELS.format(path=demo_model_path()))
    s = start_twistd(
        tmp,
        "--models", str(models),
        "--models-memory-mb", str(BUDGET_MB),
        "--cache-ram-mb", "0",
        "--keepalive", "1",
        "--threads", "2",
    )  # fmt: skip
    yield s
    stop_twistd(s)
    assert "Traceback" not in s.log_text(), s.log_text()[-3000:]


def claude(server: Twistd) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def streamed(client: anthropic.Anthropic, model: str, text: str) -> tuple[str, str | None]:
    with client.messages.stream(
        model=model,
        max_tokens=24,
        messages=[{"role": "user", "content": text}],
    ) as stream:
        reply = "".join(stream.text_stream)
        final = stream.get_final_message()
    return reply, final.stop_reason


def models_loaded(server: Twistd) -> dict[str, str]:
    health = httpx.get(server.url + "/health").json()
    return {m["name"]: m["state"] for m in health["models"]}


def test_nothing_loads_until_asked_and_v1_models_lists_both(server: Twistd) -> None:
    data = httpx.get(server.url + "/v1/models").json()["data"]
    assert [(m["id"], m["meta"].get("alias_of")) for m in data] == [
        ("coder", None),
        ("small", None),
        ("haiku", "small"),
    ]
    assert data[0]["meta"]["aliases"] == ["claude-sonnet-*", "claude-opus-*"]
    assert data[0]["meta"]["n_ctx"] == 2048


def test_an_unknown_model_is_a_404_model_not_found(server: Twistd) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="gpt-5", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert e.value.code == "model_not_found"


def test_alternating_between_models_that_do_not_both_fit_keeps_every_stream_whole(
    server: Twistd,
) -> None:
    client = claude(server)
    names = ["claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929"] * 3
    for i, name in enumerate(names):
        reply, stop = streamed(client, name, f"Say a word about the number {i}.")
        assert reply and stop in ("end_turn", "max_tokens"), (name, reply, stop)
        # Never both in memory: the budget fits one.
        assert list(models_loaded(server).values()).count("ready") == 1
    health = httpx.get(server.url + "/health").json()
    assert health["memory"]["used_bytes"] <= BUDGET_MB * MIB
    evicted = sum(
        server.metric("ds4tw_model_unloads_total", model=m, reason="evicted")
        for m in ("coder", "small")
    )
    # Each switch evicted the other model (the first load needed no room).
    assert evicted >= len(names) - 1
    log = server.log_text()
    assert "model=small " in log and "model=coder " in log
    assert "to make room for coder" in log


def test_requests_for_both_models_at_once_all_finish(server: Twistd) -> None:
    client = claude(server)
    results: dict[int, tuple[str, str | None]] = {}

    def ask(i: int, name: str) -> None:
        results[i] = streamed(client, name, f"Count to {i}.")

    threads = [
        threading.Thread(target=ask, args=(i, name))
        for i, name in enumerate(["claude-haiku-4-5", "claude-opus-4-1", "haiku", "coder"])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    for reply, stop in results.values():
        assert reply and stop in ("end_turn", "max_tokens")
    server.wait_idle()


def test_the_log_names_each_load_with_its_memory(server: Twistd) -> None:
    log = server.log_text()
    assert "ds4tw: loading small" in log
    line = next(line for line in log.splitlines() if "small loaded in" in line)
    assert "MiB (weights" in line
