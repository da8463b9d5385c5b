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

from ._api.host import ServerConfig
from ._engine.embed import Embedder, LlamaEmbedder
from ._engine.interface import (
    Aborted,
    AbortFlag,
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
from ._runtime.fleet import Model
from ._runtime.worker import Job, JobCancelled, ModelState, WorkerThreads
from ._server.app import Server
from ._server.http import LimitedSite
from ._server.tap import Options, makeService
from ._types import Finish, Stage, Timings, Usage
from ._version import __version__

__all__ = [
    "AbortFlag",
    "Aborted",
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
    "PromptCache",
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
