"""
Raw llama-cpp-python in the bench process: the physical limit of the
stack every server is built on.

The loop is the least a server could do per token with llama-cpp-python:
C{eval} one token, sample with a native sampler chain, turn the token
into bytes. It loads the model exactly as ds4tw does (same n_ctx,
n_batch = n_ubatch, threads, and C{use_extra_bufts=False} on AMX CPUs),
samples with the same chain ds4tw builds for a greedy request with
C{ignore_eos} (end-of-generation logits at -inf in C, penalties at 1.0,
greedy), and keeps the KV cache of the common prefix with the previous
prompt as both servers do.

Times: TTFT runs from holding the prompt text (tokenization included, as
a server must tokenize) to the first token's bytes; the decode rate uses
the time each token's bytes were ready (L{ds4tw.bench._stats.decode_rate}).

Exercised by the full benchmark run (it needs the model); its arithmetic
is in L{ds4tw.bench._stats}, which tests/unit/test_bench.py covers.
"""

from __future__ import annotations

import ctypes
import itertools
import statistics
import time
from collections.abc import Sequence
from typing import Any

from ds4tw import eog_tokens, open_llama, token_piece

from ._settings import Settings, model_path
from ._stats import decode_rate


class RawLlama:
    """One loaded model and the minimal generation loop."""

    def __init__(self, settings: Settings) -> None:
        self.model_path = model_path(settings.model)
        t0 = time.perf_counter()
        self.llm = open_llama(
            self.model_path, n_ctx=settings.ctx, n_batch=settings.batch, n_threads=settings.threads
        )
        # As open_llama loaded it: off on AMX CPUs (its workaround).
        self.use_extra_bufts = bool(self.llm.model_params.use_extra_bufts)
        self.load_s = time.perf_counter() - t0
        self.n_batch = settings.batch
        self.eog_ids = eog_tokens(self.llm)
        self._buf = ctypes.create_string_buffer(64)

    def close(self) -> None:
        self.llm.close()

    def _sampler(self) -> Any:
        return greedy_sampler(self.llm, self.eog_ids)

    def run(self, text: str, max_tokens: int) -> dict[str, Any]:
        """
        One generation; returns the prompt size, per-batch prefill times,
        the prefill time, TTFT and every token's time (seconds from start).
        """
        llm = self.llm
        start = time.perf_counter()
        tokens = list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
        cached = reuse_prefix(llm, tokens)
        sampler = self._sampler()
        batches: list[tuple[int, float]] = []
        for at in range(cached, len(tokens), self.n_batch):
            chunk = tokens[at : at + self.n_batch]
            t = time.perf_counter()
            llm.eval(chunk)
            batches.append((len(chunk), time.perf_counter() - t))
        prefill_done = time.perf_counter()
        times: list[float] = []
        token = -1
        for i in range(max_tokens):
            if i:
                llm.eval([token])
            token = sampler.sample(llm._ctx, -1)
            token_piece(llm, token, self._buf)
            times.append(time.perf_counter() - start)
        return {
            "prompt_tokens": len(tokens),
            "cached_tokens": cached,
            "batches": batches,
            "prefill_s": prefill_done - start,
            "ttft_s": times[0] if times else None,
            "times": times,
        }

    def trial(self, text: str, max_tokens: int) -> dict[str, Any]:
        """One generation in the shape of L{ds4tw.bench._throughput.trial_numbers}."""
        r = self.run(text, max_tokens)
        times = r["times"]
        intervals = [b - a for a, b in itertools.pairwise(times)]
        return {
            "status": 200,
            "error": None,
            "ttft_s": r["ttft_s"],
            "tokens": len(times),
            "text_events": len(times),
            "decode_tps": decode_rate(times),
            "steady_tps": 1.0 / statistics.median(intervals) if intervals else None,
            "finish_reason": "length",
            "prompt_tokens": r["prompt_tokens"],
            # Raw-only detail: the per-token intervals and prefill batches.
            "intervals_s": intervals,
            "batches": r["batches"],
            "prefill_eval_s": r["prefill_s"],
            "cached_tokens": r["cached_tokens"],
        }


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


def greedy_sampler(llm: Any, eog_ids: list[int]) -> Any:
    """The chain ds4tw builds for a greedy C{ignore_eos} request."""
    from llama_cpp._internals import LlamaSampler

    n_vocab = llm.n_vocab()
    sampler = LlamaSampler()
    sampler.add_logit_bias(n_vocab, {t: float("-inf") for t in eog_ids})
    sampler.add_penalties(
        n_vocab=n_vocab,
        penalty_last_n=64,
        penalty_repeat=1.0,
        penalty_freq=0.0,
        penalty_present=0.0,
    )
    sampler.add_greedy()
    return sampler
