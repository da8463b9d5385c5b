"""The public API is exactly what __all__ says, and each name is the private object."""

from __future__ import annotations

import ds4tw
import ds4tw.testing
from ds4tw import _app, _engine, _host, _http, _llama, _scripted, _tap, _types, _worker


def test_public_names() -> None:
    assert sorted(ds4tw.__all__) == sorted(
        [
            "ChatPrompt", "Engine", "Finish", "Grammar", "Job", "JobCancelled", "LimitedSite",
            "LlamaEngine",
            "Options", "PrefillProgress", "SamplingParams", "Server", "ServerConfig", "Stage",
            "Token",
            "Usage", "__version__", "demo_model_path", "makeService",
        ]
    )  # fmt: skip
    assert ds4tw.Server is _app.Server
    assert ds4tw.ServerConfig is _host.ServerConfig
    assert ds4tw.Engine is _engine.Engine
    assert ds4tw.Grammar is _engine.Grammar
    assert ds4tw.Finish is _types.Finish
    assert ds4tw.Stage is _types.Stage
    assert ds4tw.LlamaEngine is _llama.LlamaEngine
    assert ds4tw.Options is _tap.Options
    assert ds4tw.Job is _worker.Job
    assert ds4tw.LimitedSite is _http.LimitedSite


def test_testing_module() -> None:
    assert sorted(ds4tw.testing.__all__) == [
        "Exchange", "HTTPHarness", "Reply", "ScriptedEngine", "SteppedThreads",
    ]  # fmt: skip
    assert ds4tw.testing.ScriptedEngine is _scripted.ScriptedEngine


def test_scripted_engine_satisfies_the_engine_protocol() -> None:
    assert isinstance(ds4tw.testing.ScriptedEngine(), ds4tw.Engine)
    assert isinstance(ds4tw.LlamaEngine("/nonexistent.gguf"), ds4tw.Engine)
