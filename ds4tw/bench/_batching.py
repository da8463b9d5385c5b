"""
Continuous batching: several requests decoded at once as
sequences of one llama.cpp context, against llama.cpp's own batch API.

One part, one ds4tw server (C{twistd -n ds4tw --parallel 8}, same model,
threads, ctx and batch as the rest of the run) and, on the real model, a
raw baseline in this process; every ratio is against a baseline measured
in the same run, most of them moments apart:

  1. scaling: aggregate decode tok/s with 1, 2, 4 and 8 concurrent
     streams (greedy, C{ignore_eos}, the same C{max_tokens} each), on
     ds4tw and on the raw batch API (L{RawBatched}: C{llama_batch_init} /
     C{llama_decode} on a context opened by L{ds4tw.open_llama}
     with C{n_seq=8}, so per-sequence KV streams as ds4tw has; one token
     per sequence per step after the prompts' prefill, the same sampler
     chain as ds4tw's greedy C{ignore_eos} request). Raw and ds4tw trials
     alternate, N by N, round by round, so each ds4tw trial has a raw one
     measured just before or after it (the paired ratio). Every ds4tw
     stream must be whole: C{max_tokens} tokens, C{finish_reason:
     length}. The single stream against the raw single sequence is
     the decode target, measured here with C{--parallel 8}.
  2. reactor CPU: the twistd process's main thread (the reactor) over
     each scaling trial, from C{/proc/PID/task/PID/schedstat} (ns) and
     C{stat} (utime + stime, 10 ms ticks), per streamed token: one
     hand-off per step means fewer reactor wake-ups per token with more
     streams.
  3. TTFT of a short request (C{max_tokens} 4) while a long one decodes,
     against the same kind of request on the idle server; the step time
     of that window from C{/metrics} (C{ds4tw_step_seconds} sum/count
     deltas), so the target "its own prefill plus two steps" is checked
     as (busy TTFT - median idle TTFT) / mean step time.
  4. the worst token gap of a decoding stream while another request
     prefills a ~3,000-token prompt, against that stream's median gap
     before the prefill and against one step of the prefill (the mean
     time of the steps that prefilled, from C{/metrics} deltas over the
     prefill, L{prefill_step_s}; and the stream's median gap inside the
     prefill window, which is one mixed step); at the
     run's C{--batch} and, in the full run, also at C{--batch 64} on a
     second server (the trade-off: shorter steps, longer prefill).

Each scaling trial also records the cores other processes used while it
ran (L{Foreign}): on a shared 2-core machine a second ggml process slows
a 2-thread decode many times over, so a trial with foreign load is noise,
not a result.

Aggregate rate: each stream's tokens after its first, summed, over the
wall time from the earliest first token to the latest last token,
C{sum(n_i - 1) / (max last - min first)}; for one stream that is
L{ds4tw.bench._stats.decode_rate}, and for streams whose first tokens
come from the same step it is exact (staggered starts make it a slight
underestimate). The raw loop goes through the same function with the time
each token's bytes were ready.

With the scripted engine there is no raw baseline (a note says so): the
server runs C{--model scripted:...} at the run's pace, every other
measurement is the same (its step time is fixed, so the scaling is the
server layer's alone).

Covered by tests/unit/test_bench.py (the pure functions) and
tests/integration/test_bench_smoke.py (the scripted run).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import _client, _cpu, _noise
from ._servers import READY_TIMEOUT, ServerProcess, ds4tw_twistd, running
from ._settings import Settings
from ._sse import ResponseReader, delta_text, finish_reason, text_times, usage
from ._stats import ratio, summary
from ._throughput import trial_numbers
from ._workload import Prompts, completion_body

#: Slots of the batching server, and the most sequences the raw baseline runs.
PARALLEL = 8
#: Concurrent streams of the scaling trials.
STREAMS = (1, 2, 4, 8)
#: Streams compared for the reactor CPU per token.
CPU_STREAMS = (1, 4)
#: The short request of the TTFT trials.
SHORT_TOKENS = 4
#: The second --batch of the gap trials (full run): shorter steps, longer prefill.
SMALL_BATCH = 64
#: Tokens of the prompt prefilled beside a decoding stream.
GAP_PROMPT_TOKENS = 3000
#: Per-request bound (seconds).
REQUEST_TIMEOUT = 300.0

# Continuous batching's targets.
AGGREGATE_AT_4_TARGET = 1.4
TTFT_STEPS_TARGET = 2.0
#: The worst gap while another request prefills, in steps of that prefill:
#: one step, with room for a shared machine's jitter.
GAP_STEPS_TARGET = 1.5


@dataclass(frozen=True)
class Sizes:
    """What the part measures, for the full run or C{--quick}."""

    decode_tokens: int
    rounds: int
    short_words: int
    ttft_trials: int
    long_tokens: int
    gap_prompt_tokens: int
    gap_trials: int
    gap_batches: tuple[int, ...]


def sizes(settings: Settings) -> Sizes:
    scripted = settings.engine == "scripted"
    # One long prompt and its answer must fit one slot's --ctx.
    room = max(64, settings.ctx - 128)
    if settings.quick:
        return Sizes(
            decode_tokens=48,
            rounds=1,
            short_words=4 if scripted else 12,
            ttft_trials=3,
            long_tokens=min(1000, room),
            gap_prompt_tokens=min(1500, room),
            gap_trials=1,
            gap_batches=(settings.batch,),
        )
    small = () if settings.batch == SMALL_BATCH else (SMALL_BATCH,)
    return Sizes(
        decode_tokens=128,
        rounds=3,
        short_words=4 if scripted else 16,
        ttft_trials=5,
        long_tokens=min(1500, room),
        gap_prompt_tokens=min(GAP_PROMPT_TOKENS, room),
        gap_trials=2,
        gap_batches=(settings.batch, *small),
    )


# -- pure arithmetic -------------------------------------------------------


@dataclass(frozen=True)
class StreamTimes:
    """One stream's token count and the times of its first and last token."""

    tokens: int
    first: float
    last: float


def aggregate_rate(streams: Sequence[StreamTimes]) -> float | None:
    """
    Tokens per second of streams decoded together: each stream's tokens
    after its first, summed, over the earliest first token to the latest
    last one (None without a positive span).
    """
    if not streams:
        return None
    span = max(s.last for s in streams) - min(s.first for s in streams)
    tokens = sum(max(0, s.tokens - 1) for s in streams)
    if span <= 0 or tokens <= 0:
        return None
    return tokens / span


def whole(trial: dict[str, Any], max_tokens: int) -> bool:
    """A stream that got all it asked for: 200, no error, C{max_tokens}, length."""
    return (
        trial.get("status") == 200
        and not trial.get("error")
        and trial.get("tokens") == max_tokens
        and trial.get("finish_reason") == "length"
    )


def gap_analysis(times: Sequence[float], start: float, end: float) -> dict[str, Any]:
    """
    A decoding stream's token gaps around a window (another request's
    prefill, from sending it to its first token): the median gap before
    the window, the gaps that overlap it (their worst, their median: one
    mixed step each), and the median after it.
    """
    points = sorted(times)
    before: list[float] = []
    inside: list[float] = []
    after: list[float] = []
    for a, b in itertools.pairwise(points):
        if b <= start:
            before.append(b - a)
        elif a >= end:
            after.append(b - a)
        else:
            inside.append(b - a)
    return {
        "median_before_s": statistics.median(before) if before else None,
        "max_inside_s": max(inside) if inside else None,
        "median_inside_s": statistics.median(inside) if inside else None,
        "gaps_inside": len(inside),
        "median_after_s": statistics.median(after) if after else None,
        "max_before_s": max(before) if before else None,
    }


def parse_step_metrics(text: str) -> dict[str, float]:
    """
    The step metrics of ds4tw's /metrics: sum and count of step seconds,
    batch size, tokens and prefill tokens, the steps that prefilled
    nothing (the prefill histogram's C{le="0"} bucket), and slots busy.
    """
    out: dict[str, float] = {}
    names = {
        "ds4tw_step_seconds": "step_s",
        "ds4tw_step_batch_size": "batch_size",
        "ds4tw_step_tokens": "step_tokens",
        "ds4tw_step_prefill_tokens": "prefill_tokens",
    }
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ds4tw_slots_busy":
                out["slots_busy"] = s.value
            elif s.name == "ds4tw_slots":
                out["slots"] = s.value
            for base, key in names.items():
                if s.name == base + "_sum":
                    out[key + "_sum"] = s.value
                elif s.name == base + "_count":
                    out[key + "_count"] = s.value
                elif (
                    s.name == base + "_bucket"
                    and base == "ds4tw_step_prefill_tokens"
                    and float(s.labels.get("le", "nan")) == 0.0
                ):
                    out["no_prefill_steps"] = s.value
    return out


def step_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the steps between two /metrics samples did: counts and means."""

    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    steps = d("step_s_count")
    prefill_steps = steps - d("no_prefill_steps")
    return {
        "steps": int(steps),
        "prefill_steps": int(prefill_steps),
        "mean_step_s": d("step_s_sum") / steps if steps > 0 else None,
        "mean_batch_size": d("batch_size_sum") / steps if steps > 0 else None,
        "mean_step_tokens": d("step_tokens_sum") / steps if steps > 0 else None,
        "prefill_tokens": int(d("prefill_tokens_sum")),
        "mean_prefill_tokens_per_prefill_step": (
            d("prefill_tokens_sum") / prefill_steps if prefill_steps > 0 else None
        ),
    }


def prefill_step_s(steps: dict[str, Any], decode_step_s: float | None) -> float | None:
    """
    The mean time of the steps that prefilled, from a L{step_delta}: the
    window's step time minus its decode-only steps (each taken as
    C{decode_step_s}, the decoding stream's own median gap before), over
    the prefill steps.
    """
    mean, n, k = steps.get("mean_step_s"), steps.get("steps") or 0, steps.get("prefill_steps") or 0
    if mean is None or k <= 0:
        return None
    decode_only = max(0, n - k) * (decode_step_s or 0.0)
    return max(0.0, mean * n - decode_only) / k


def excess_steps(busy_s: float | None, alone_s: float | None, step_s: float | None) -> float | None:
    """How many steps a TTFT beside another request exceeds the TTFT alone."""
    if busy_s is None or alone_s is None or not step_s:
        return None
    return (busy_s - alone_s) / step_s


def parse_schedstat(text: str) -> float:
    """Seconds on CPU from a /proc/.../schedstat line (its first field, in ns)."""
    return int(text.split()[0]) / 1e9


def words_for(tokens: int, tokens_per_word: float) -> int:
    """Words of a generated prompt that make about C{tokens} tokens."""
    return max(2, math.floor(tokens / max(tokens_per_word, 1e-6)))


def scaling_summary(
    trials: dict[int, list[dict[str, Any]]], reference: int = 1
) -> dict[str, dict[str, Any]]:
    """
    Per number of streams: the aggregate rate's summary over the rounds
    and the ratio of the medians to C{reference} streams.
    """
    out: dict[str, dict[str, Any]] = {}
    medians: dict[int, float | None] = {}
    for n, got in sorted(trials.items()):
        agg = summary([t["aggregate_tps"] for t in got])
        medians[n] = agg["median"]
        out[str(n)] = {"aggregate_tps": agg}
    for n in trials:
        out[str(n)]["ratio_to_1"] = ratio(medians[n], medians.get(reference))
    return out


# -- the raw baseline ------------------------------------------------------


class RawBatched:
    """
    The model opened as ds4tw opens it with C{n_seq} sequences, decoded
    through llama.cpp's batch API directly: the least a batching server
    could do.
    """

    def __init__(self, settings: Settings, n_seq: int = PARALLEL) -> None:
        import llama_cpp

        from ds4tw import eog_tokens, open_llama

        from ._settings import model_path

        self._C = llama_cpp
        t0 = time.perf_counter()
        self.llm = open_llama(
            model_path(settings.model),
            n_ctx=settings.ctx,
            n_batch=settings.batch,
            n_threads=settings.threads,
            n_seq=n_seq,
        )
        self.load_s = time.perf_counter() - t0
        self.n_seq = n_seq
        self.n_batch = settings.batch
        self.eog_ids = eog_tokens(self.llm)
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, n_seq), 0, 1)
        self._buf = ctypes.create_string_buffer(64)

    def close(self) -> None:
        if self._batch is not None:
            self._C.llama_batch_free(self._batch)
            self._batch = None
        self.llm.close()

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def _sampler(self) -> Any:
        from ._raw import greedy_sampler

        return greedy_sampler(self.llm, self.eog_ids)

    def _decode(self, items: Sequence[tuple[int, int, int, bool]]) -> None:
        b = self._batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)
        rc = self._C.llama_decode(self.llm._ctx.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def run(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[float]]:
        """
        Decode C{max_tokens} tokens for each prompt together (one sequence
        each, prompts prefilled together within the batch size, then one
        token per sequence per step); every token's time, per sequence.
        """
        from ds4tw import token_piece

        if len(prompts) > self.n_seq:
            raise ValueError(f"at most {self.n_seq} sequences")
        C, llm = self._C, self.llm
        C.llama_memory_clear(C.llama_get_memory(llm._ctx.ctx), False)
        samplers = [self._sampler() for _ in prompts]
        times: list[list[float]] = [[] for _ in prompts]
        last = [-1] * len(prompts)
        clock = time.perf_counter
        try:
            items = [
                (tok, pos, seq, pos == len(p) - 1)
                for seq, p in enumerate(prompts)
                for pos, tok in enumerate(p)
            ]
            for at in range(0, len(items), self.n_batch):
                chunk = items[at : at + self.n_batch]
                self._decode(chunk)
                for i, (_, _, seq, logits) in enumerate(chunk):
                    if logits:
                        last[seq] = samplers[seq].sample(llm._ctx, i)
                        token_piece(llm, last[seq], self._buf)
                        times[seq].append(clock())
            n_past = [len(p) for p in prompts]
            for _ in range(max_tokens - 1):
                self._decode([(last[s], n_past[s], s, True) for s in range(len(prompts))])
                for s in range(len(prompts)):
                    last[s] = samplers[s].sample(llm._ctx, s)
                    token_piece(llm, last[s], self._buf)
                    n_past[s] += 1
                    times[s].append(clock())
        finally:
            for sampler in samplers:
                sampler.close()
        return times

    def trial(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> dict[str, Any]:
        times = self.run(prompts, max_tokens)
        streams = [StreamTimes(len(t), t[0], t[-1]) for t in times if t]
        return {
            "streams": len(prompts),
            "aggregate_tps": aggregate_rate(streams),
            "per_stream_tps": [ratio(len(t) - 1, t[-1] - t[0]) for t in times if len(t) > 1],
        }


# -- the server ------------------------------------------------------------


def batching_server(
    settings: Settings,
    workdir: Path,
    name: str,
    *,
    batch: int,
    scripted_model: str | None = None,
) -> ServerProcess:
    """
    C{twistd -n ds4tw --parallel 8 --batch BATCH} on the real model, or on
    C{--model scripted:...} when C{scripted_model} is given.
    """
    s = dataclasses.replace(settings, batch=batch, model=scripted_model or settings.model)
    return ds4tw_twistd(s, workdir, name, max_queue=64, parallel=PARALLEL)


def scripted_model(settings: Settings) -> str:
    """The C{--model scripted:...} at the run's scripted pace."""
    tps = 1000.0 / settings.scripted_token_ms
    prefill_tps = settings.scripted_prefill_batch * 1000.0 / settings.scripted_prefill_ms
    return f"scripted:tps={tps:g},prefill_tps={prefill_tps:g},eos=0"


def step_metrics(server: ServerProcess) -> dict[str, float]:
    status, body = _client.get(server.port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return parse_step_metrics(body.decode("utf-8", errors="replace"))


def main_thread_cpu(pid: int) -> dict[str, float]:
    """The main thread's CPU seconds (schedstat, and stat's ticks) and all threads'."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            out["main_sched_s"] = parse_schedstat(f.read())
    except (OSError, ValueError, IndexError):
        pass
    times = _cpu.thread_times(pid)
    out["main_stat_s"] = times.get(pid, 0.0)
    out["all_stat_s"] = sum(times.values())
    return out


class Watch:
    """
    The hang-up rule of a background stream: counts its text events as
    reads arrive (incrementally: a long stream is not re-parsed per read)
    and hangs up once C{stop} is set.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.tokens = 0
        self._seen = 0

    def __call__(self, reader: ResponseReader) -> bool:
        for e in reader.events[self._seen :]:
            if delta_text(e) is not None:
                self.tokens += 1
        self._seen = len(reader.events)
        return self.stop.is_set()

    def wait_tokens(self, n: int, timeout: float = 120.0) -> bool:
        deadline = time.perf_counter() + timeout
        while self.tokens < n:
            if time.perf_counter() > deadline:
                return False
            time.sleep(0.002)
        return True


@dataclass
class Background:
    """A stream running in a thread until its L{Watch} says stop."""

    server: ServerProcess
    body: dict[str, Any]
    watch: Watch = field(default_factory=Watch)
    result: _client.Stream | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Background:
        def go() -> None:
            self.result = _client.stream(
                self.server.port,
                "/v1/completions",
                self.body,
                timeout=REQUEST_TIMEOUT,
                hang_up=self.watch,
            )

        self._thread = threading.Thread(target=go, name="bench-background", daemon=True)
        self._thread.start()
        return self

    def finish(self) -> _client.Stream:
        self.watch.stop.set()
        assert self._thread is not None
        self._thread.join(REQUEST_TIMEOUT)
        if self.result is None:
            raise RuntimeError("the background stream did not end")
        return self.result


# -- the measurements ------------------------------------------------------


def ds4tw_trial(server: ServerProcess, prompts: Sequence[str], max_tokens: int) -> dict[str, Any]:
    """C{len(prompts)} concurrent streams; aggregate rate, wholeness, reactor CPU, steps."""
    n = len(prompts)
    barrier = threading.Barrier(n)

    def one(prompt: str) -> _client.Stream:
        body = completion_body("ds4tw", prompt, max_tokens)
        barrier.wait()
        return _client.stream(server.port, "/v1/completions", body, timeout=REQUEST_TIMEOUT)

    m0, cpu0 = step_metrics(server), main_thread_cpu(server.pid)
    with ThreadPoolExecutor(n) as ex:
        streams = list(ex.map(one, prompts))
    cpu1, m1 = main_thread_cpu(server.pid), step_metrics(server)
    per = [trial_numbers(s, max_tokens) for s in streams]
    times = [text_times(s.events, None) for s in streams]
    spans = [StreamTimes(p["tokens"], t[0], t[-1]) for p, t in zip(per, times, strict=True) if t]
    tokens = sum(p["tokens"] for p in per)
    cpu = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
    return {
        "streams": n,
        "aggregate_tps": aggregate_rate(spans) if len(spans) == n else None,
        "per_stream_tps": [p["decode_tps"] for p in per],
        "whole": [whole(p, max_tokens) for p in per],
        "tokens": [p["tokens"] for p in per],
        "finish_reasons": [p["finish_reason"] for p in per],
        "errors": [str(p["error"] or p["status"]) for p in per if p["error"] or p["status"] != 200],
        "cpu_s": cpu,
        "streamed_tokens": tokens,
        "steps": step_delta(m0, m1),
    }


class Foreign:
    """
    Cores other processes used over one trial (L{ds4tw.bench._noise}):
    recorded beside each scaling trial, so a number taken while another
    job shared the two cores can be told from a clean one.
    """

    def __init__(self) -> None:
        self._seen: dict[int, float] = {}

    def sample(self) -> tuple[float | None, float, float]:
        return _noise.busy_seconds(), _noise.own_seconds(self._seen), time.perf_counter()

    def since(self, a: tuple[float | None, float, float]) -> float | None:
        b = self.sample()
        if a[0] is None or b[0] is None:
            return None
        return _noise.foreign_cores((a[0], b[0]), (a[1], b[1]), (a[2], b[2]))


def _rotate(items: Sequence[Any], k: int) -> list[Any]:
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


def scaling(
    server: ServerProcess,
    raw: RawBatched | None,
    sz: Sizes,
    prompts: Prompts,
) -> dict[str, Any]:
    """Aggregate decode rate at 1, 2, 4, 8 streams, raw and ds4tw alternating."""
    # Warm-up (not counted): the server's first batched steps, the raw loop's.
    ds4tw_trial(server, [prompts.words(sz.short_words) for _ in range(2)], 8)
    if raw is not None:
        raw.trial([raw.tokenize(prompts.words(sz.short_words)) for _ in range(2)], 8)
    ds: dict[int, list[dict[str, Any]]] = {n: [] for n in STREAMS}
    rw: dict[int, list[dict[str, Any]]] = {n: [] for n in STREAMS}
    paired: dict[int, list[float | None]] = {n: [] for n in STREAMS}
    foreign = Foreign()
    k = 0
    for r in range(sz.rounds):
        for n in _rotate(STREAMS, r):
            texts = [prompts.words(sz.short_words) for _ in range(n)]
            order = _rotate(["ds4tw", "raw"] if raw is not None else ["ds4tw"], k)
            k += 1
            got: dict[str, dict[str, Any]] = {}
            for stack in order:
                if stack == "raw":
                    assert raw is not None
                    tokens = [raw.tokenize(t) for t in texts]
                    before = foreign.sample()
                    got["raw"] = raw.trial(tokens, sz.decode_tokens)
                    got["raw"]["foreign_cores"] = foreign.since(before)
                    rw[n].append(got["raw"])
                else:
                    _client.wait_idle(server.port, timeout=60)
                    before = foreign.sample()
                    got["ds4tw"] = ds4tw_trial(server, texts, sz.decode_tokens)
                    got["ds4tw"]["foreign_cores"] = foreign.since(before)
                    ds[n].append(got["ds4tw"])
            if "raw" in got:
                paired[n].append(ratio(got["ds4tw"]["aggregate_tps"], got["raw"]["aggregate_tps"]))
    ds_out = scaling_summary(ds)
    for n, trials in ds.items():
        entry = ds_out[str(n)]
        flags = [w for t in trials for w in t["whole"]]
        entry["streams_whole"] = sum(flags)
        entry["streams_total"] = len(flags)
        entry["all_whole"] = bool(flags) and all(flags)
        entry["per_stream_tps"] = summary([v for t in trials for v in t["per_stream_tps"]])
        entry["errors"] = [e for t in trials for e in t["errors"]]
        entry["finish_reasons"] = sorted({str(f) for t in trials for f in t["finish_reasons"]})
        entry["mean_batch_size"] = summary([t["steps"]["mean_batch_size"] for t in trials])
        entry["mean_step_s"] = summary([t["steps"]["mean_step_s"] for t in trials])
        entry["foreign_cores"] = summary([t["foreign_cores"] for t in trials])
        if raw is not None:
            entry["vs_raw"] = summary(paired[n])
    out: dict[str, Any] = {"ds4tw": ds_out, "cpu": reactor_cpu(ds)}
    if raw is not None:
        raw_out = scaling_summary(rw)
        for n, trials in rw.items():
            raw_out[str(n)]["per_stream_tps"] = summary(
                [v for t in trials for v in t["per_stream_tps"]]
            )
            raw_out[str(n)]["foreign_cores"] = summary([t["foreign_cores"] for t in trials])
        out["raw"] = raw_out
    return out


def reactor_cpu(trials: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Reactor (main thread) and all-thread CPU per streamed token, per number of streams."""
    out: dict[str, Any] = {}
    for n, got in sorted(trials.items()):
        tokens = sum(t["streamed_tokens"] for t in got)

        def per_token(key: str, got: list[dict[str, Any]] = got, tokens: int = tokens) -> Any:
            if tokens <= 0 or any(key not in t["cpu_s"] for t in got):
                return None
            return sum(t["cpu_s"][key] for t in got) * 1e3 / tokens

        out[str(n)] = {
            "tokens": tokens,
            "main_ms_per_token": per_token("main_sched_s"),
            "main_ms_per_token_ticks": per_token("main_stat_s"),
            "all_threads_ms_per_token": per_token("all_stat_s"),
        }
    a, b = (out.get(str(n), {}) for n in CPU_STREAMS)
    out["ratio_4_to_1"] = ratio(b.get("main_ms_per_token"), a.get("main_ms_per_token"))
    out["ratio_4_to_1_ticks"] = ratio(
        b.get("main_ms_per_token_ticks"), a.get("main_ms_per_token_ticks")
    )
    return out


def _short(server: ServerProcess, prompt: str) -> dict[str, Any]:
    s = _client.stream(
        server.port,
        "/v1/completions",
        completion_body("ds4tw", prompt, SHORT_TOKENS),
        timeout=REQUEST_TIMEOUT,
    )
    got = trial_numbers(s, SHORT_TOKENS)
    times = text_times(s.events, None)
    return {
        "ttft_s": got["ttft_s"],
        "whole": whole(got, SHORT_TOKENS),
        "first_token_at": times[0] if times else None,
        "prompt_tokens": got["prompt_tokens"],
    }


def _decoding(server: ServerProcess, sz: Sizes, prompts: Prompts, tokens: int) -> Background:
    """A long request in the background, once it has streamed C{tokens} tokens."""
    long = Background(
        server, completion_body("ds4tw", prompts.words(sz.short_words), sz.long_tokens)
    ).start()
    if not long.watch.wait_tokens(tokens):
        long.finish()
        raise RuntimeError("the long request did not start decoding")
    return long


def ttft_beside(server: ServerProcess, sz: Sizes, prompts: Prompts) -> dict[str, Any]:
    """A short request's TTFT alone, then while a long one decodes."""
    _client.wait_idle(server.port, timeout=60)
    alone = []
    for _ in range(sz.ttft_trials):
        alone.append(_short(server, prompts.words(sz.short_words)))
        _client.wait_idle(server.port, timeout=60)
    long = _decoding(server, sz, prompts, 8)
    m0 = step_metrics(server)
    t0 = time.perf_counter()
    busy = []
    for _ in range(sz.ttft_trials):
        busy.append(_short(server, prompts.words(sz.short_words)))
        # Let the long one run alone for a few steps between trials.
        seen = long.watch.tokens
        long.watch.wait_tokens(seen + 3, timeout=30)
    m1 = step_metrics(server)
    window = time.perf_counter() - t0
    s = long.finish()
    long_times = text_times(s.events, None)
    for trial in busy:
        at = trial["first_token_at"]
        # Beside the long one for real: it still streamed after this answer began.
        trial["overlapped"] = at is not None and bool(long_times) and long_times[-1] > at
    steps = step_delta(m0, m1)
    alone_ttft = summary([t["ttft_s"] for t in alone])
    busy_ttft = summary([t["ttft_s"] for t in busy])
    step_s = steps["mean_step_s"]
    excess = [excess_steps(t["ttft_s"], alone_ttft["median"], step_s) for t in busy]
    long_gaps = [b - a for a, b in itertools.pairwise(long_times)]
    return {
        "alone_ttft_s": alone_ttft,
        "busy_ttft_s": busy_ttft,
        "excess_steps": summary(excess),
        "steps": steps,
        "window_s": window,
        "long_alone_step_s": statistics.median(long_gaps) if long_gaps else None,
        "short_whole": all(t["whole"] for t in [*alone, *busy]),
        "overlapped": sum(1 for t in busy if t["overlapped"]),
        "trials": len(busy),
        "short_prompt_tokens": summary([t["prompt_tokens"] for t in [*alone, *busy]]),
        "long_tokens_seen": len(long_times),
    }


def gap_trial(
    server: ServerProcess, sz: Sizes, prompts: Prompts, long_prompt: str
) -> dict[str, Any]:
    """The token gaps of a decoding stream while another request prefills C{long_prompt}."""
    _client.wait_idle(server.port, timeout=120)
    decode = _decoding(server, sz, prompts, 16)
    m0 = step_metrics(server)
    s = _client.stream(
        server.port,
        "/v1/completions",
        completion_body("ds4tw", long_prompt, 1),
        timeout=REQUEST_TIMEOUT,
    )
    m1 = step_metrics(server)
    seen = decode.watch.tokens
    decode.watch.wait_tokens(seen + 16, timeout=30)
    d = decode.finish()
    long_times = text_times(s.events, None)
    u = usage(s.events) or {}
    end = long_times[0] if long_times else time.perf_counter()
    got = gap_analysis(text_times(d.events, None), s.sent, end)
    steps = step_delta(m0, m1)
    steps["mean_prefill_step_s"] = prefill_step_s(steps, got["median_before_s"])
    worst = got["max_inside_s"]
    return {
        **got,
        "prefill_s": long_times[0] - s.sent if long_times else None,
        "prompt_tokens": u.get("prompt_tokens"),
        "long_status": s.status,
        "long_finish_reason": finish_reason(s.events),
        "steps": steps,
        "worst_over_median_before": ratio(worst, got["median_before_s"]),
        "worst_over_prefill_step": ratio(worst, steps["mean_prefill_step_s"]),
        "worst_over_median_inside": ratio(worst, got["median_inside_s"]),
        "decode_error": d.error,
    }


def gap_summary(trials: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    return {
        "batch": batch,
        "worst_gap_s": summary([t["max_inside_s"] for t in trials]),
        "median_gap_before_s": summary([t["median_before_s"] for t in trials]),
        "median_gap_inside_s": summary([t["median_inside_s"] for t in trials]),
        "prefill_step_s": summary([t["steps"]["mean_prefill_step_s"] for t in trials]),
        "prefill_s": summary([t["prefill_s"] for t in trials]),
        "prompt_tokens": summary([t["prompt_tokens"] for t in trials]),
        "worst_over_median_before": summary([t["worst_over_median_before"] for t in trials]),
        "worst_over_prefill_step": summary([t["worst_over_prefill_step"] for t in trials]),
        "worst_over_median_inside": summary([t["worst_over_median_inside"] for t in trials]),
        "trials": trials,
    }


def measure(
    settings: Settings,
    workdir: Path,
    *,
    mark: Callable[[str], None] = lambda _: None,
    throughput_ratio: float | None = None,
) -> dict[str, Any]:
    """
    The whole part. C{throughput_ratio}: the throughput part's ds4tw/raw
    decode ratio when it ran earlier in the same run (reported beside this
    part's own single-stream ratio).
    """
    sz = sizes(settings)
    scripted = settings.engine == "scripted"
    prompts = Prompts(settings.seed + 9)
    model = scripted_model(settings) if scripted else None
    raw: RawBatched | None = None
    notes: list[str] = []
    out: dict[str, Any] = {
        "parallel": PARALLEL,
        "streams": list(STREAMS),
        "decode_tokens": sz.decode_tokens,
        "rounds": sz.rounds,
        "sizes": dataclasses.asdict(sz),
        "source": (
            "client-seen SSE token times (ds4tw), token-ready times (raw); /metrics step "
            "histograms (sum/count deltas); /proc/PID/task/PID/schedstat and stat of twistd's "
            "main thread"
        ),
        "where": (
            f"twistd -n ds4tw --parallel {PARALLEL} (batch {settings.batch}, ctx {settings.ctx}, "
            f"threads {settings.threads}; the gap part also at --batch "
            f"{', '.join(str(b) for b in sz.gap_batches[1:]) or '-'} on a second server); raw: "
            f"llama_decode on open_llama(n_seq={PARALLEL}) in the bench process"
        ),
        "notes": notes,
    }
    try:
        if scripted:
            notes.append("scripted engine: no raw batched baseline (no model)")
            tokens_per_word = 6.5  # one token per character
        else:
            mark("batching: load raw batched")
            raw = RawBatched(settings)
            out["raw_load_s"] = raw.load_s
            sample = prompts.words(1000)
            tokens_per_word = len(raw.tokenize(sample)) / 1000
        long_words = words_for(sz.gap_prompt_tokens, tokens_per_word)
        gap: dict[str, Any] = {}
        for i, batch in enumerate(sz.gap_batches):
            if i > 0 and raw is not None:
                raw.close()  # the second server's KV cache instead
                raw = None
            name = f"ds4tw-batching-{batch}"
            server = batching_server(settings, workdir, name, batch=batch, scripted_model=model)
            with running(server, READY_TIMEOUT) as ds:
                if i == 0:
                    mark("batching: scaling")
                    got = scaling(ds, raw, sz, prompts)
                    out["ds4tw"], out["cpu"] = got["ds4tw"], got["cpu"]
                    out["raw"] = got.get("raw")
                    mark("batching: ttft beside a long decode")
                    out["ttft"] = ttft_beside(ds, sz, prompts)
                mark(f"batching: gap while prefilling (batch {batch})")
                trials = [
                    gap_trial(ds, sz, prompts, prompts.words(long_words))
                    for _ in range(sz.gap_trials)
                ]
                gap[str(batch)] = gap_summary(trials, batch)
        out["gap"] = gap
    finally:
        if raw is not None:
            raw.close()
    ds1 = (out.get("ds4tw") or {}).get("1") or {}
    out["single_stream"] = {
        "ds4tw_over_raw": (ds1.get("vs_raw") or {}).get("median"),
        "ds4tw_over_raw_of_medians": ratio(
            (ds1.get("aggregate_tps") or {}).get("median"),
            ((((out.get("raw") or {}).get("1") or {}).get("aggregate_tps")) or {}).get("median"),
        ),
        "throughput_part_ratio": throughput_ratio,
        "note": (
            "ds4tw_over_raw: one stream on the --parallel 8 server over one sequence of the raw "
            "batch loop, paired trials; throughput_part_ratio: the throughput part's ds4tw/raw "
            "(default --parallel, raw llama-cpp-python eval loop) when it ran in this run"
        ),
    }
    return out
