"""
Embedding models: the L{Embedder} protocol (what the embedding worker
asks of a model), L{LlamaEmbedder} on llama-cpp-python, and
L{ScriptedEmbedder}, its test double.

An embedder turns token arrays into one L2-normalised vector each (as
OpenAI's are, and as C{Llama.embed(normalize=True)} gives). Its life is
an engine's (L{ds4tw._engine.interface.Engine}): L{Embedder.prepare}
(any thread, cheap) reads the vocabulary and the GGUF's metadata, so
L{Embedder.tokenize}, L{Embedder.n_embd} and an estimate of
L{Embedder.memory} work before the weights are loaded;
L{Embedder.load} (the model thread) loads them, reporting progress to a
callback that can stop it (L{LoadAborted}); L{Embedder.close} frees them
and a later L{Embedder.load} brings them back.

L{Embedder.embed} runs on the model thread. L{LlamaEmbedder} packs
as many inputs as fit into one C{llama_batch}, each its own sequence
(up to C{n_seq} sequences and C{n_batch} tokens per decode), decodes once
and reads each sequence's pooled vector (C{llama_get_embeddings_seq}),
as llama.cpp's embedding example and C{Llama.embed} do. A pooled
sequence must sit whole in one micro-batch, so C{n_ubatch} is
C{n_batch} and an input may have at most L{Embedder.n_ctx} tokens (at
most C{n_batch}); the caller refuses longer ones before they get here.
The KV memory is cleared before every decode: nothing is reused between
inputs. Batched and alone give the same vectors (cosine >= 0.99998 on the
demo model; tests/integration/test_embeddings_engine.py). On a CPU an
embedding is compute-bound prefill, already batched over its own tokens,
so packing inputs together gains little (measured on two cores, 64 short
texts: 1.05-1.3x the inputs per second of one decode each); the gain is
fewer decodes and steps, and more on a GPU.

Pooling is the GGUF's (C{{arch}.pooling_type}: mean, cls or last)
unless overridden. A causal chat model's GGUF names none, and a vector
per token is no OpenAI embedding (llama-server refuses it on
C{/v1/embeddings}: "Pooling type 'none' is not OAI compatible"), so such
a model is pooled by mean, which the log says.

The decode watches the worker's L{AbortFlag} through llama.cpp's abort
callback the way L{ds4tw._engine.llama.LlamaEngine} does (libc's
C{strlen} as the callback: no Python, no GIL), so a batch whose every
request was cancelled stops inside its decode and raises L{Aborted}.

Covered by tests/unit/test_embeddings_api.py (L{ScriptedEmbedder}, through
the worker and the route) and tests/integration/test_embeddings_engine.py
(L{LlamaEmbedder} against C{Llama.embed}).
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from twisted.logger import Logger

from .interface import Aborted, AbortFlag, LoadAborted, LoadProgress, MemoryUse
from .llama import (
    DECODE_ABORTED,
    _Batch,
    _llama_log,
    _Vocab,
    abort_callback,
    logged_buffers,
    no_extra_buffers,
)

__all__ = [
    "POOLINGS",
    "Embedder",
    "LlamaEmbedder",
    "ScriptedEmbedder",
    "fits",
]

log = Logger()

#: The poolings an embedding can have, as llama.cpp numbers them
#: (C{LLAMA_POOLING_TYPE_*}).
POOLINGS: dict[str, int] = {"mean": 1, "cls": 2, "last": 3}
_POOLING_NAMES = {-1: "unspecified", 0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


@runtime_checkable
class Embedder(Protocol):
    """
    One embedding model. L{prepare}, L{tokenize}, L{memory} and the
    properties run in any thread; L{load}, L{embed} and L{close} only in
    the model thread.
    """

    #: The name clients use for the model.
    model_id: str

    @property
    def n_ctx(self) -> int:
        """The most tokens one input may have (valid after L{prepare})."""

    @property
    def n_batch(self) -> int:
        """The most tokens one decode takes, over all its inputs."""

    @property
    def n_seq(self) -> int:
        """The most inputs one decode takes."""

    @property
    def n_embd(self) -> int:
        """The vectors' length (valid after L{prepare})."""

    @property
    def n_vocab(self) -> int:
        """Token ids are below this (valid after L{prepare})."""

    @property
    def pooling(self) -> str:
        """The pooling in effect: C{"mean"}, C{"cls"} or C{"last"} (after L{prepare})."""

    def prepare(self) -> None:
        """
        Read the vocabulary and the model's shape without its weights (any
        thread; cheap, idempotent). Raises when the model cannot be used.
        """

    def load(self, progress: LoadProgress | None = None) -> None:
        """
        Load the weights (model thread), preparing first if needed.
        C{progress} is called with the fraction loaded; when it returns
        False the load stops and raises L{LoadAborted}, leaving the model
        unloaded. Also loads a model that was L{close}d.
        """

    def close(self) -> None:
        """Free the weights (model thread); harmless when not loaded."""

    def tokenize(self, text: str) -> list[int]:
        """
        C{text}'s tokens with the special tokens the model's vocabulary
        adds (BOS, EOS or SEP as its GGUF says), special tokens in the
        text parsed: llama.cpp's embedding example and server (any thread,
        after L{prepare}).
        """

    def embed(self, inputs: Sequence[Sequence[int]], abort: AbortFlag | None) -> list[list[float]]:
        """
        One L2-normalised vector per input, in order (model thread). Each
        input has 1 to L{n_ctx} tokens, each below L{n_vocab} (else
        ValueError, before any work). Inputs that fit one decode
        (L{fits}) are decoded together. Raises L{Aborted} when C{abort}
        stopped it (nothing is returned then).
        """

    def memory(self) -> MemoryUse:
        """What the model takes loaded: measured once loaded, else estimated."""


def fits(embedder: Embedder, count: int, tokens: int, length: int) -> bool:
    """
    Whether one more input of C{length} tokens joins a decode that holds
    C{count} inputs of C{tokens} tokens so far. The first input always
    does (it is at most L{Embedder.n_ctx}, so at most C{n_batch}).
    """
    if count == 0:
        return True
    return count < embedder.n_seq and tokens + length <= embedder.n_batch


def _groups(embedder: Embedder, inputs: Sequence[Sequence[int]]) -> Iterator[list[Sequence[int]]]:
    group: list[Sequence[int]] = []
    tokens = 0
    for x in inputs:
        if not fits(embedder, len(group), tokens, len(x)):
            yield group
            group, tokens = [], 0
        group.append(x)
        tokens += len(x)
    if group:
        yield group


def _check_inputs(embedder: Embedder, inputs: Sequence[Sequence[int]]) -> None:
    for i, x in enumerate(inputs):
        if not 0 < len(x) <= embedder.n_ctx:
            raise ValueError(f"input {i} has {len(x)} tokens; 1 to {embedder.n_ctx} are allowed")
        if min(x) < 0 or max(x) >= embedder.n_vocab:
            raise ValueError(f"input {i} has a token id outside 0..{embedder.n_vocab - 1}")


def _normalised(values: Any) -> list[float]:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    return [float(x) for x in (v / norm if norm > 0 else v)]


@contextmanager
def _load_progress(progress: LoadProgress | None) -> Iterator[Callable[[], bool]]:
    """
    llama.cpp's load progress callback, while the context lasts, calling
    C{progress}; yields "did it say stop". C{Llama()} has no argument for
    it, so the default model params are patched for the call (as
    L{no_extra_buffers} does). The callback is a Python one: it runs a
    few dozen times per load, in the loading thread, not per graph node.
    """
    if progress is None:
        yield lambda: False
        return
    import llama_cpp
    import llama_cpp.llama_cpp as C

    stopped = False

    def report(fraction: float, _data: Any) -> bool:
        nonlocal stopped
        try:
            go = bool(progress(float(fraction)))
        except Exception:
            log.failure("ds4tw: the load progress callback failed")
            go = True
        stopped = stopped or not go
        return go

    callback = llama_cpp.llama_progress_callback(report)
    original = C.llama_model_default_params

    def params() -> Any:
        p = original()
        p.progress_callback = callback
        p.progress_callback_user_data = None
        return p

    C.llama_model_default_params = params
    try:
        yield lambda: stopped
    finally:
        C.llama_model_default_params = original


def measured_memory(llm: Any, lines: Sequence[str]) -> MemoryUse:
    """
    What the loaded embedder takes, measured as the chat engine measures
    itself: its tensors (C{llama_model_size}), and the KV and compute
    buffers llama.cpp logged allocating while loading (L{logged_buffers}).
    """
    import llama_cpp

    logged = logged_buffers(lines)
    return MemoryUse(
        weights=int(llama_cpp.llama_model_size(llm._model.model)),
        kv=logged.get("kv", 0),
        compute=logged.get("compute", 0),
        cache=0,
        measured=True,
    )


class _Sizes:
    """What every embedder says of its shape (set by each one's constructor or prepare)."""

    _n_ctx: int
    _n_batch: int
    _n_seq: int
    _n_embd: int
    _n_vocab: int
    _pooling: str

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_batch(self) -> int:
        return self._n_batch

    @property
    def n_seq(self) -> int:
        return self._n_seq

    @property
    def n_embd(self) -> int:
        return self._n_embd

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def pooling(self) -> str:
        return self._pooling


class LlamaEmbedder(_Sizes):
    """
    A GGUF model through llama-cpp-python, loaded for embeddings.

    @param n_ctx: the most tokens one input may have (capped at the
        model's training context).
    @param n_batch: the most tokens one decode takes over all its inputs
        (default C{n_ctx}; at least C{n_ctx}); also the KV cells, as
        every decode starts from an empty cache. Keep it moderate: the
        decode's attention spans every cell of the batch, its other
        sequences' masked out but computed (measured on two cores: 16
        inputs of ~100 tokens took 1.2-1.6x longer as one 2048-token
        decode than as 16 decodes), and on a CPU batching gains little
        anyway (the module docstring).
    @param n_seq: the most inputs one decode takes (at most llama.cpp's
        C{llama_max_parallel_sequences()}, 256 here).
    @param pooling: C{"mean"}, C{"cls"} or C{"last"}; None for the GGUF's
        (mean when it names none).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 512,
        n_batch: int | None = None,
        n_seq: int = 32,
        n_threads: int | None = None,
        pooling: str | None = None,
        model_id: str | None = None,
    ) -> None:
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        n_batch = n_ctx if n_batch is None else n_batch
        if n_ctx < 1 or n_batch < n_ctx:
            raise ValueError(
                f"n_batch ({n_batch}) must hold the longest input (n_ctx {n_ctx}): a pooled "
                "input is decoded whole"
            )
        if not 1 <= n_seq <= 256:
            raise ValueError(f"n_seq must be 1 to 256, not {n_seq}")
        self.model_path = Path(path)
        self.model_id = model_id or self.model_path.stem
        self._n_ctx = n_ctx
        self._n_batch = n_batch
        self._n_seq = n_seq
        self._n_threads = n_threads or os.cpu_count() or 1
        self._pooling_option = pooling
        self._pooling = pooling or "mean"
        self._prepare_lock = threading.Lock()
        self._vocab: _Vocab | None = None
        self._metadata: dict[str, str] = {}
        self._n_embd = 0
        self._n_vocab = 0
        self._llm: Any = None
        self._batch: _Batch | None = None
        self._abort_cb: Any = None
        self._idle_flag = AbortFlag()
        self._watched: AbortFlag | None = None
        self._memory: MemoryUse | None = None

    # -- any thread ------------------------------------------------------

    def prepare(self) -> None:
        with self._prepare_lock:
            if self._vocab is not None:
                return
            if not self.model_path.is_file():
                raise FileNotFoundError(f"model file not found: {self.model_path}")
            # The vocabulary only, as the chat engine reads it: no context, no
            # weights, so tokenizing and the model's shape are known before
            # the load is even decided.
            vocab = _Vocab(self.model_path, {})
            md = vocab.metadata
            arch = md.get("general.architecture", "")
            try:
                self._n_embd = int(md[f"{arch}.embedding_length"])
            except (KeyError, ValueError) as e:
                raise ValueError(
                    f"{self.model_path}: no {arch}.embedding_length in the GGUF"
                ) from e
            self._n_vocab = vocab.n_vocab
            train = int(md.get(f"{arch}.context_length", "0") or 0)
            if train and self._n_ctx > train:
                log.info(
                    "ds4tw: {model}: inputs capped at the model's training context, "
                    "{train} tokens (not {n_ctx})",
                    model=self.model_id,
                    train=train,
                    n_ctx=self._n_ctx,
                )
                self._n_ctx = train
            self._pooling = self._pooling_from(md.get(f"{arch}.pooling_type"))
            self._metadata = md
            self._vocab = vocab

    def _pooling_from(self, gguf: str | None) -> str:
        if self._pooling_option is not None:
            return self._pooling_option
        name = _POOLING_NAMES.get(int(gguf), gguf) if gguf and gguf.lstrip("-").isdigit() else None
        if name in POOLINGS:
            return name
        log.info(
            "ds4tw: {model}: the GGUF names {what}; embeddings are mean-pooled "
            "(choose with --pooling mean|cls|last)",
            model=self.model_id,
            what=f"pooling {name}" if name else "no pooling (a causal model's per-token vectors)",
        )
        return "mean"

    def tokenize(self, text: str) -> list[int]:
        self.prepare()
        assert self._vocab is not None
        return self._vocab.tokenize(text, add_bos=True)

    def memory(self) -> MemoryUse:
        if self._memory is not None:
            return self._memory
        self.prepare()
        md = self._metadata
        arch = md.get("general.architecture", "")

        def meta(key: str, default: int = 0) -> int:
            try:
                return int(md.get(f"{arch}.{key}", default))
            except ValueError:
                return default

        n_layer = meta("block_count")
        n_head = max(1, meta("attention.head_count", 1))
        n_head_kv = meta("attention.head_count_kv", n_head)
        head_k = meta("attention.key_length", self._n_embd // n_head)
        head_v = meta("attention.value_length", self._n_embd // n_head)
        causal = md.get(f"{arch}.attention.causal", "true") != "false"
        # f16 K and V for every cell of one batch (a non-causal encoder
        # keeps no KV cache); logits and the graph's scratch for a whole
        # batch, an overestimate (measured on the demo model: 149 MiB of
        # output and compute buffers against 192 estimated).
        kv = n_layer * n_head_kv * (head_k + head_v) * 2 * self._n_batch if causal else 0
        compute = 2 * self._n_batch * (self._n_vocab + self._n_embd) * 4
        return MemoryUse(
            weights=self.model_path.stat().st_size,
            kv=kv,
            compute=compute,
            cache=0,
            measured=False,
        )

    # -- model thread ----------------------------------------------------

    def load(self, progress: LoadProgress | None = None) -> None:
        self.prepare()
        if self._llm is not None:
            return
        from llama_cpp import Llama

        lines: list[str] = []
        with (
            no_extra_buffers(),
            _load_progress(progress) as stopped,
            _llama_log(lines),
        ):
            try:
                llm = Llama(
                    model_path=str(self.model_path),
                    n_ctx=self._n_batch,
                    n_batch=self._n_batch,
                    n_ubatch=self._n_batch,
                    n_threads=self._n_threads,
                    n_threads_batch=self._n_threads,
                    embedding=True,
                    pooling_type=POOLINGS[self._pooling],
                    verbose=False,
                )
            except ValueError as e:
                if stopped():
                    raise LoadAborted(f"{self.model_id}: load stopped") from e
                raise
        import llama_cpp

        in_effect = _POOLING_NAMES.get(int(llama_cpp.llama_pooling_type(llm._ctx.ctx)))
        if in_effect != self._pooling:
            llm.close()
            raise RuntimeError(
                f"{self.model_id}: llama.cpp pools by {in_effect}, not {self._pooling}"
            )
        self._llm = llm
        self._batch = _Batch(self._n_batch)
        self._abort_cb = abort_callback()
        self._watched = None
        self._watch(None)
        self._memory = measured_memory(llm, lines)
        log.info(
            "ds4tw: loaded {path} for embeddings ({pooling} pooling, {n_embd} dimensions; "
            "inputs up to {n_ctx} tokens, {n_seq} inputs and {n_batch} tokens per decode, "
            "threads={threads}; {mib} MiB)",
            path=str(self.model_path),
            pooling=self._pooling,
            n_embd=self._n_embd,
            n_ctx=self._n_ctx,
            n_seq=self._n_seq,
            n_batch=self._n_batch,
            threads=self._n_threads,
            mib=self._memory.mib()["total"],
        )

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
            self._batch = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None
        self._watched = None
        self._memory = None

    def _watch(self, abort: AbortFlag | None) -> None:
        """Make C{abort} the flag llama.cpp checks between graph nodes."""
        import llama_cpp

        if self._abort_cb is None or self._llm is None:
            return
        flag = abort if abort is not None else self._idle_flag
        if flag is self._watched:
            return
        llama_cpp.llama_set_abort_callback(self._llm._ctx.ctx, self._abort_cb, flag.address)
        self._watched = flag

    def embed(self, inputs: Sequence[Sequence[int]], abort: AbortFlag | None) -> list[list[float]]:
        import llama_cpp
        import numpy as np

        llm, batch = self._llm, self._batch
        assert llm is not None and batch is not None, "load() first"
        _check_inputs(self, inputs)
        ctx = llm._ctx.ctx
        memory = llama_cpp.llama_get_memory(ctx)
        out: list[list[float]] = []
        for group in _groups(self, inputs):
            if abort is not None and abort.is_set:
                raise Aborted
            batch.clear()
            for seq, tokens in enumerate(group):
                for pos, token in enumerate(tokens):
                    # Every token is an output: pooling reads them all.
                    batch.add(token, pos, seq, True)
            if memory:
                llama_cpp.llama_memory_clear(memory, True)
            self._watch(abort)
            rc = batch.decode(ctx)
            if rc != 0:
                if memory:
                    llama_cpp.llama_memory_clear(memory, True)
                if rc == DECODE_ABORTED or (abort is not None and abort.is_set):
                    raise Aborted
                raise RuntimeError(f"llama_decode returned {rc}")
            for seq in range(len(group)):
                ptr = llama_cpp.llama_get_embeddings_seq(ctx, seq)
                if not ptr:
                    raise RuntimeError(f"llama.cpp has no pooled embedding for sequence {seq}")
                out.append(_normalised(np.ctypeslib.as_array(ptr, shape=(self._n_embd,))))
        if memory:
            llama_cpp.llama_memory_clear(memory, True)
        return out


class ScriptedEmbedder(_Sizes):
    """
    An L{Embedder} with no model, for tests (public as
    C{ds4tw.testing.ScriptedEmbedder}).

    A token is a whitespace-separated word (its id a CRC of the word, below
    C{n_vocab}); a vector is the normalised sum of one fixed pseudo-random
    vector per token, so equal texts get equal vectors and texts sharing
    words are closer than texts that do not. L{calls} records every
    L{embed} call's inputs (how the worker batched them), and
    L{embed_hook}, when set, is called at the start of each call before
    the abort flag is checked, so a test can cancel "during" a decode.

    @param load_steps: progress reports per L{load}, each a chance to stop it.
    @param memory_mb: what L{memory} reports the weights take (MiB).
    """

    def __init__(
        self,
        model_id: str = "scripted-embed",
        *,
        n_embd: int = 8,
        n_ctx: int = 64,
        n_batch: int | None = None,
        n_seq: int = 8,
        n_vocab: int = 1000,
        pooling: str = "mean",
        load_steps: int = 0,
        memory_mb: float = 0.0,
    ) -> None:
        self.model_id = model_id
        self._n_embd = n_embd
        self._n_ctx = n_ctx
        self._n_batch = n_ctx if n_batch is None else n_batch
        if self._n_batch < n_ctx:
            raise ValueError("n_batch must hold the longest input (n_ctx)")
        self._n_seq = n_seq
        self._n_vocab = n_vocab
        self._pooling = pooling
        self.load_steps = load_steps
        self.memory_mb = memory_mb
        self.loaded = False
        self.loads = 0
        self.aborted_loads = 0
        self.closes = 0
        #: Each L{embed} call's inputs, in call order.
        self.calls: list[list[list[int]]] = []
        #: Calls stopped by their abort flag.
        self.aborted: list[list[list[int]]] = []
        self.embed_hook: Callable[[], object] | None = None

    @property
    def inputs_per_call(self) -> list[int]:
        return [len(c) for c in self.calls]

    def prepare(self) -> None:
        pass

    def load(self, progress: LoadProgress | None = None) -> None:
        for i in range(1, self.load_steps + 1):
            if progress is not None and not progress(i / self.load_steps):
                self.aborted_loads += 1
                raise LoadAborted(f"{self.model_id}: load stopped at step {i}/{self.load_steps}")
        self.loaded = True
        self.loads += 1

    def close(self) -> None:
        if self.loaded:
            self.closes += 1
        self.loaded = False

    def tokenize(self, text: str) -> list[int]:
        return [zlib.crc32(word.encode()) % self._n_vocab for word in text.split()]

    def vector(self, tokens: Sequence[int]) -> list[float]:
        """The vector L{embed} gives C{tokens} (for tests to compare with)."""
        total = [0.0] * self._n_embd
        for t in tokens:
            for i in range(self._n_embd):
                total[i] += ((t * 2654435761 + i * 40503) % 2001) / 1000.0 - 1.0
        return _normalised(total)

    def embed(self, inputs: Sequence[Sequence[int]], abort: AbortFlag | None) -> list[list[float]]:
        assert self.loaded, "load() first"
        _check_inputs(self, inputs)
        batch = [list(x) for x in inputs]
        self.calls.append(batch)
        if self.embed_hook is not None:
            self.embed_hook()
        if abort is not None and abort.is_set:
            self.aborted.append(batch)
            raise Aborted
        return [self.vector(x) for x in batch]

    def memory(self) -> MemoryUse:
        return MemoryUse(
            weights=int(self.memory_mb * 2**20),
            kv=0,
            compute=0,
            cache=0,
            measured=self.loaded,
        )
