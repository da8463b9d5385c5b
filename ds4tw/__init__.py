"""
ds4tw: a Twisted + Klein server for local GGUF models over the OpenAI
(chat completions, completions, responses) and Anthropic (messages) APIs.
No silent streams; no wasted compute.

The public API is what this module exports; everything else is private
and may change. Test doubles are in L{ds4tw.testing}. Every type in a
public signature is exported (pinned by tests/unit/test_exports.py).

    from ds4tw import LlamaEngine, Server
    server = Server(LlamaEngine("model.gguf"))
    server.setServiceParent(application)      # or server.startService()
    resource = server.resource()               # mount anywhere
    site = LimitedSite(resource)               # or serve it with twistd's limits

Beneath L{LlamaEngine}, the model as ds4tw loads and reads it with
llama-cpp-python, for work beside the engine (the benchmark's raw
baseline is built on these): L{open_llama} (a C{llama_cpp.Llama} loaded
as the engine loads one, with its workarounds), L{eog_tokens},
L{token_piece}, L{abort_callback}, and L{no_extra_buffers} (llama.cpp's
AMX workaround, for a model another library loads).
"""

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from ._api.host import ServerConfig
    from ._engine.embed import Embedder, LlamaEmbedder
    from ._engine.interface import (
        Aborted,
        AbortFlag,
        BackendLost,
        ChatPrompt,
        Engine,
        Failed,
        Finished,
        Grammar,
        LoadAborted,
        MemoryUse,
        PrefillProgress,
        SamplingParams,
        StepResult,
        Token,
        generate,
    )
    from ._engine.kvcache import CacheStats, PromptCache
    from ._engine.llama import (
        EngineOptions,
        LlamaEngine,
        abort_callback,
        demo_model_path,
        eog_tokens,
        no_extra_buffers,
        open_llama,
        token_piece,
    )
    from ._engine.process import ProcessEngine, Recipe
    from ._runtime.fleet import Model
    from ._runtime.worker import Job, JobCancelled, ModelState, WorkerThreads
    from ._server.app import Server
    from ._server.http import LimitedSite
    from ._server.tap import Options, makeService
    from ._types import Finish, Stage, Timings, Usage

#: Where each public name lives: imported on first use (PEP 562), so that
#: a process that needs one corner of ds4tw (the model's child process,
#: ds4tw-rpc-worker) does not import the server, Klein and every dialect
#: (1.2 s of a child's start).
_EXPORTS: dict[str, str] = {
    "AbortFlag": "._engine.interface",
    "Aborted": "._engine.interface",
    "BackendLost": "._engine.interface",
    "CacheStats": "._engine.kvcache",
    "ChatPrompt": "._engine.interface",
    "Embedder": "._engine.embed",
    "Engine": "._engine.interface",
    "EngineOptions": "._engine.llama",
    "Failed": "._engine.interface",
    "Finish": "._types",
    "Finished": "._engine.interface",
    "Grammar": "._engine.interface",
    "Job": "._runtime.worker",
    "JobCancelled": "._runtime.worker",
    "LimitedSite": "._server.http",
    "LlamaEmbedder": "._engine.embed",
    "LlamaEngine": "._engine.llama",
    "LoadAborted": "._engine.interface",
    "MemoryUse": "._engine.interface",
    "Model": "._runtime.fleet",
    "ModelState": "._runtime.worker",
    "Options": "._server.tap",
    "PrefillProgress": "._engine.interface",
    "ProcessEngine": "._engine.process",
    "PromptCache": "._engine.kvcache",
    "Recipe": "._engine.process",
    "SamplingParams": "._engine.interface",
    "Server": "._server.app",
    "ServerConfig": "._api.host",
    "Stage": "._types",
    "StepResult": "._engine.interface",
    "Timings": "._types",
    "Token": "._engine.interface",
    "Usage": "._types",
    "WorkerThreads": "._runtime.worker",
    "abort_callback": "._engine.llama",
    "demo_model_path": "._engine.llama",
    "eog_tokens": "._engine.llama",
    "generate": "._engine.interface",
    "makeService": "._server.tap",
    "no_extra_buffers": "._engine.llama",
    "open_llama": "._engine.llama",
    "token_piece": "._engine.llama",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ds4tw' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AbortFlag",
    "Aborted",
    "BackendLost",
    "CacheStats",
    "ChatPrompt",
    "Embedder",
    "Engine",
    "EngineOptions",
    "Failed",
    "Finish",
    "Finished",
    "Grammar",
    "Job",
    "JobCancelled",
    "LimitedSite",
    "LlamaEmbedder",
    "LlamaEngine",
    "LoadAborted",
    "MemoryUse",
    "Model",
    "ModelState",
    "Options",
    "PrefillProgress",
    "ProcessEngine",
    "PromptCache",
    "Recipe",
    "SamplingParams",
    "Server",
    "ServerConfig",
    "Stage",
    "StepResult",
    "Timings",
    "Token",
    "Usage",
    "WorkerThreads",
    "__version__",
    "abort_callback",
    "demo_model_path",
    "eog_tokens",
    "generate",
    "makeService",
    "no_extra_buffers",
    "open_llama",
    "token_piece",
]
