"""
The four dialects compared (issue 22): does asking in one API cost
anything over asking in another?

One server, C{twistd -n ds4tw --parallel 1 --cache-ram-mb 0} on the
run's model (the demo model by default; C{--model scripted:...} on
C{--engine scripted}), and the same streamed, greedy request
(C{temperature} 0, the same user message, the same token limit) through
each of L{DIALECTS}:

  - C{chat}: OpenAI chat completions, C{POST /v1/chat/completions} (SSE);
    the baseline every ratio is taken against (L{BASELINE});
  - C{responses}: OpenAI Responses, C{POST /v1/responses} (SSE);
  - C{messages}: Anthropic Messages, C{POST /v1/messages} (SSE);
  - C{ollama}: Ollama, C{POST /api/chat} (NDJSON).

Interleaved: every round has its own prompt, and sends it to the four
dialects in turn, the order rotated by one each round (so every dialect
takes every place equally often over a multiple of four rounds). Before
the four, the round's prompt is sent once through the baseline with one
token (not counted), so that each of the four finds the prompt in the
one slot's KV cache: the four then prefill the same one token or so,
their TTFT is the server's request path (parsing, templating, the first
frame) and not a prefill, and their answers are the same greedy tokens.
No dialect but the baseline can ask for C{ignore_eos}, so the answers
may end before the limit; they end at the same token in all four (the
report says whether they did: L{same_answer}).

The same client and the same arithmetic for the four
(L{ds4tw.bench._client}'s timestamped socket reads, split into frames
here: SSE events at their blank line, NDJSON lines at their newline, a
frame's time the read that completed it):

  - B{TTFT}: from sending the request to the first frame carrying
    content text;
  - B{decode tok/s}, client-side: (tokens - 1) over the time from the
    first content frame to the last, the tokens counted by the dialect's
    own counter (C{usage.completion_tokens}, C{usage.output_tokens},
    C{message_delta}'s C{usage.output_tokens}, Ollama's C{eval_count});
    and the steady rate, 1 / the median interval between content frames;
  - B{server decode tok/s}: the job's own log line (completion tokens
    over its decode seconds), the same for the four; and Ollama's own
    C{eval_count} / C{eval_duration} (ns) beside it;
  - B{bytes}: on the wire (every byte read from the socket: the HTTP
    head, the chunked encoding, the frames) and of the body, per
    generated token; a content frame's size (what each further token
    costs) and the rest of the body (the opening and closing frames);
  - B{reactor CPU per token}: the server's main thread (the Twisted
    reactor, which renders every frame) over each dialect's requests, from
    C{/proc/PID/task/*/stat} (L{ds4tw.bench._cpu}; 10 ms ticks, summed over
    all the rounds).

Each is reported per dialect (summaries over the rounds) and as a ratio
to the baseline: the median over rounds of the paired ratio (this
dialect / the baseline, in the same round, moments apart) with its
interquartile range, and the ratio of the medians beside it.

Covered by tests/unit/test_bench_dialects.py (the frames, the counters,
the arithmetic and the report's shape, on canned streams and timings)
and tests/integration/test_bench_smoke.py (a quick run on the scripted
engine).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import _client, _cpu
from ._batching import Foreign, scripted_model
from ._cache import parse_done_lines
from ._servers import READY_TIMEOUT, ServerProcess, ds4tw_twistd, running
from ._settings import Settings
from ._sse import ResponseReader
from ._stats import percentile, ratio, summary
from ._workload import Prompts

Dialect = Literal["chat", "responses", "messages", "ollama"]
Framing = Literal["sse", "ndjson"]

DIALECTS: tuple[Dialect, ...] = ("chat", "responses", "messages", "ollama")
#: Every ratio is this dialect's figure over the baseline's, same round.
BASELINE: Dialect = "chat"
PATHS: dict[Dialect, str] = {
    "chat": "/v1/chat/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
    "ollama": "/api/chat",
}
FRAMINGS: dict[Dialect, Framing] = {
    "chat": "sse",
    "responses": "sse",
    "messages": "sse",
    "ollama": "ndjson",
}
#: The name every request gives (a C{--model} server answers to any).
MODEL = "bench"
#: Per-request bound (seconds).
REQUEST_TIMEOUT = 120.0
#: How long a job's log line may take to appear after its stream ended.
LOG_WAIT_S = 5.0

#: The per-trial figures summarised per dialect.
FIGURES = (
    "ttft_s",
    "decode_tps",
    "steady_tps",
    "server_decode_tps",
    "eval_tps",
    "tokens",
    "wire_bytes_per_token",
    "body_bytes_per_token",
    "content_frame_bytes",
    "other_body_bytes",
)
#: The figures paired with the baseline's, round by round (dialect / baseline).
PAIRED = (
    "ttft_s",
    "decode_tps",
    "steady_tps",
    "server_decode_tps",
    "wire_bytes_per_token",
    "body_bytes_per_token",
)


@dataclass(frozen=True)
class Sizes:
    """What the part measures, for the full run or C{--quick}."""

    #: Rounds of the four dialects (a multiple of four: every place equally often).
    rounds: int
    #: The token limit of every request.
    max_tokens: int
    #: Words of every round's prompt (before the instruction).
    prompt_words: int


def sizes(settings: Settings) -> Sizes:
    if settings.quick:
        return Sizes(rounds=4, max_tokens=32, prompt_words=12)
    return Sizes(rounds=20, max_tokens=128, prompt_words=16)


# -- the requests ------------------------------------------------------------


def prompt_text(prompts: Prompts, words: int) -> str:
    """A round's prompt: fresh words first (no two rounds alike), then a long answer asked for."""
    return f"{prompts.words(words)}\nWrite a long story that uses every word above."


def request_body(dialect: Dialect, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The same streamed greedy turn in C{dialect}'s own words."""
    messages = [{"role": "user", "content": prompt}]
    if dialect == "chat":
        return {
            "model": MODEL,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    if dialect == "responses":
        return {
            "model": MODEL,
            "input": messages,
            "max_output_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
    if dialect == "messages":
        return {
            "model": MODEL,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
    return {
        "model": MODEL,
        "messages": messages,
        "stream": True,
        "options": {"temperature": 0.0, "num_predict": max_tokens},
    }


# -- the frames ----------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One SSE event or NDJSON line, when the read that completed it arrived."""

    t: float
    #: Its bytes in the body, its separator included.
    size: int
    #: The event's data or the line, decoded (None: no data, or not JSON).
    payload: Any
    #: The SSE data's text (C{[DONE]}), or the NDJSON line.
    text: str = ""
    event: str | None = None


def _decode(t: float, raw: bytes, size: int, framing: Framing) -> Frame:
    text = raw.decode("utf-8", errors="replace")
    event = None
    if framing == "sse":
        data = []
        for line in text.split("\n"):
            line = line.rstrip("\r")
            if line.startswith(":") or not line:
                continue  # a comment (keepalive, progress)
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
        text = "\n".join(data)
    try:
        payload = json.loads(text) if text.strip() else None
    except ValueError:
        payload = None
    return Frame(t, size, payload, text, event)


def split_frames(body: bytes, ends: Sequence[tuple[float, int]], framing: Framing) -> list[Frame]:
    """
    The frames of a response body, each stamped with the time of the read
    that completed it (C{ends}: L{ResponseReader.body_ends}). SSE frames
    end at a blank line (ds4tw writes C{\\n}), NDJSON lines at C{\\n}.
    """
    sep = b"\n\n" if framing == "sse" else b"\n"
    frames: list[Frame] = []
    start, i = 0, 0
    while True:
        k = body.find(sep, start)
        if k < 0:
            return frames
        stop = k + len(sep)
        while i < len(ends) and ends[i][1] < stop:
            i += 1
        t = ends[i][0] if i < len(ends) else (ends[-1][0] if ends else 0.0)
        if body[start:k].strip():
            frames.append(_decode(t, body[start:k], stop - start, framing))
        start = stop


def content(dialect: Dialect, frame: Frame) -> str:
    """The content text a frame carries in C{dialect} (empty: none)."""
    p = frame.payload
    if not isinstance(p, dict):
        return ""
    got: Any = None
    if dialect == "chat":
        choices = p.get("choices") or []
        if choices and isinstance(choices[0], dict):
            got = (choices[0].get("delta") or {}).get("content")
    elif dialect == "responses":
        if p.get("type") == "response.output_text.delta":
            got = p.get("delta")
    elif dialect == "messages":
        delta = p.get("delta") or {}
        if p.get("type") == "content_block_delta" and delta.get("type") == "text_delta":
            got = delta.get("text")
    else:
        got = (p.get("message") or {}).get("content")
    return got if isinstance(got, str) else ""


def counters(dialect: Dialect, frames: Sequence[Frame]) -> dict[str, Any]:
    """
    What the dialect's own frames say of the turn: its tokens, prompt and
    cached tokens, why it ended, whether its final frame came, an error
    frame, and (Ollama) the server's own decode rate.
    """
    out: dict[str, Any] = {
        "tokens": None,
        "prompt_tokens": None,
        "cached_tokens": None,
        "finish": None,
        "done": False,
        "error": None,
        "eval_tps": None,
    }
    for f in frames:
        p = f.payload
        if f.text == "[DONE]":
            # The end of a chat stream; the others end with a frame of their own.
            out["done"] = out["done"] or dialect == "chat"
            continue
        if not isinstance(p, dict):
            continue
        kind = p.get("type")
        if p.get("error") or kind in ("error", "response.failed"):
            out["error"] = json.dumps(p.get("error") or p, ensure_ascii=False)[:300]
            continue
        if dialect == "chat":
            usage = p.get("usage")
            if isinstance(usage, dict):
                out["tokens"] = usage.get("completion_tokens")
                out["prompt_tokens"] = usage.get("prompt_tokens")
                out["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get(
                    "cached_tokens"
                )
            for choice in p.get("choices") or []:
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    out["finish"] = choice["finish_reason"]
        elif dialect == "responses":
            if kind in ("response.completed", "response.incomplete"):
                response = p.get("response") or {}
                usage = response.get("usage") or {}
                out["tokens"] = usage.get("output_tokens")
                out["prompt_tokens"] = usage.get("input_tokens")
                out["cached_tokens"] = (usage.get("input_tokens_details") or {}).get(
                    "cached_tokens"
                )
                out["finish"] = (response.get("incomplete_details") or {}).get("reason") or (
                    response.get("status")
                )
                out["done"] = True
        elif dialect == "messages":
            if kind == "message_delta":
                usage = p.get("usage") or {}
                out["tokens"] = usage.get("output_tokens")
                cached = usage.get("cache_read_input_tokens") or 0
                if usage.get("input_tokens") is not None:
                    out["prompt_tokens"] = usage["input_tokens"] + cached
                out["cached_tokens"] = cached
                out["finish"] = (p.get("delta") or {}).get("stop_reason")
            elif kind == "message_stop":
                out["done"] = True
        elif p.get("done"):
            out["tokens"] = p.get("eval_count")
            out["prompt_tokens"] = p.get("prompt_eval_count")
            out["finish"] = p.get("done_reason")
            out["done"] = True
            ns = p.get("eval_duration")
            if isinstance(ns, int | float) and ns > 0 and p.get("eval_count"):
                out["eval_tps"] = p["eval_count"] / (ns / 1e9)
    return out


def trial_numbers(dialect: Dialect, stream: _client.Stream) -> dict[str, Any]:
    """One streamed turn's client-seen numbers, the same arithmetic for every dialect."""
    reader: ResponseReader = stream.reader
    body = bytes(reader.body)
    frames = split_frames(body, reader.body_ends, FRAMINGS[dialect])
    carried = [(f, content(dialect, f)) for f in frames]
    texts = [(f, c) for f, c in carried if c]
    times = [f.t for f, _ in texts]
    c = counters(dialect, frames)
    tokens = c["tokens"] if isinstance(c["tokens"], int) else None
    span = times[-1] - times[0] if len(times) >= 2 else 0.0
    intervals = [b - a for a, b in itertools.pairwise(times)]
    typical = statistics.median(intervals) if intervals else 0.0
    wire = sum(n for _, n in reader.reads)
    frame_bytes = [f.size for f, _ in texts]
    return {
        "status": stream.status,
        "error": stream.error or c["error"],
        "ttft_s": times[0] - stream.sent if times else None,
        "end_s": times[-1] - stream.sent if times else None,
        "tokens": tokens,
        "prompt_tokens": c["prompt_tokens"],
        "cached_tokens": c["cached_tokens"],
        "finish": c["finish"],
        "done": c["done"],
        "frames": len(frames),
        "content_frames": len(texts),
        "decode_tps": (tokens - 1) / span
        if tokens is not None and tokens >= 2 and span > 0
        else None,
        "steady_tps": 1.0 / typical if typical > 0 else None,
        "eval_tps": c["eval_tps"],
        "text": "".join(t for _, t in texts),
        "wire_bytes": wire,
        "body_bytes": len(body),
        "wire_bytes_per_token": wire / tokens if tokens else None,
        "body_bytes_per_token": len(body) / tokens if tokens else None,
        "content_frame_bytes": statistics.median(frame_bytes) if frame_bytes else None,
        "other_body_bytes": len(body) - sum(frame_bytes),
    }


def whole(t: Mapping[str, Any]) -> bool:
    """A turn that ended as it should: 200, no error, its final frame, text, its tokens counted."""
    return (
        t.get("status") == 200
        and not t.get("error")
        and bool(t.get("done"))
        and bool(t.get("text"))
        and bool(t.get("tokens"))
    )


# -- the arithmetic ------------------------------------------------------------


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """L{summary} with the quartiles (C{p25}, C{p75}) beside it."""
    out = summary(values)
    clean = out.get("values") or []
    out["p25"] = percentile(clean, 25)
    out["p75"] = percentile(clean, 75)
    return out


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


def same_answer(rounds: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """How many rounds gave every dialect the same text and the same token count."""
    texts = tokens = compared = 0
    differ = []
    for k, r in enumerate(rounds):
        got = [r[d] for d in DIALECTS if d in r]
        if len(got) < len(DIALECTS):
            continue
        compared += 1
        same_text = len({t.get("text") for t in got}) == 1
        same_tokens = len({t.get("tokens") for t in got}) == 1
        texts += same_text
        tokens += same_tokens
        if not (same_text and same_tokens):
            differ.append(
                {
                    "round": k,
                    "tokens": {d: r[d].get("tokens") for d in DIALECTS},
                    "chars": {d: len(r[d].get("text") or "") for d in DIALECTS},
                }
            )
    return {"compared": compared, "same_text": texts, "same_tokens": tokens, "differ": differ}


def summarise(
    rounds: Sequence[Mapping[str, Mapping[str, Any]]],
    cpu: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """
    Per dialect: every figure's summary over the rounds, its streams
    whole, its errors and (with C{cpu}: main and other thread seconds by
    dialect) its reactor CPU per token; then against L{BASELINE}: every
    paired figure's ratio round by round (median and quartiles), the
    TTFT's difference in ms, and the ratio of the medians.
    """
    per: dict[str, Any] = {}
    for d in DIALECTS:
        got = [r[d] for r in rounds if d in r]
        per[d] = {key: summary([t.get(key) for t in got]) for key in FIGURES}
        per[d]["whole"] = sum(whole(t) for t in got)
        per[d]["trials"] = len(got)
        per[d]["errors"] = [
            f"{t.get('status')} {t.get('error')}"
            for t in got
            if t.get("status") != 200 or t.get("error")
        ]
        if cpu is not None and d in cpu:
            tokens = sum(t.get("tokens") or 0 for t in got)
            per[d]["cpu_per_token"] = _cpu.per_token(dict(cpu[d]), tokens)
    vs: dict[str, Any] = {}
    for d in DIALECTS:
        if d == BASELINE:
            continue
        pairs = [(r[d], r[BASELINE]) for r in rounds if d in r and BASELINE in r]
        entry: dict[str, Any] = {
            key: spread([ratio(a.get(key), b.get(key)) for a, b in pairs]) for key in PAIRED
        }
        entry["ttft_diff_ms"] = spread(
            [
                None
                if a.get("ttft_s") is None or b.get("ttft_s") is None
                else (a["ttft_s"] - b["ttft_s"]) * 1e3
                for a, b in pairs
            ]
        )
        entry["of_medians"] = {
            key: ratio(per[d][key]["median"], per[BASELINE][key]["median"]) for key in PAIRED
        }
        mine = (per[d].get("cpu_per_token") or {}).get("main_ms")
        base = (per[BASELINE].get("cpu_per_token") or {}).get("main_ms")
        entry["reactor_ms_per_token"] = ratio(mine, base)
        vs[d] = entry
    return {"per_dialect": per, "vs_baseline": vs, "same_answer": same_answer(rounds)}


# -- the server and the measurement --------------------------------------------


def server_numbers(server: ServerProcess, offset: int) -> dict[str, Any]:
    """The job's own log line after C{offset}: its tokens and times (waits up to L{LOG_WAIT_S})."""
    deadline = time.perf_counter() + LOG_WAIT_S
    while True:
        lines = parse_done_lines(server.log_since(offset))
        if lines:
            line = lines[-1]
            decode = line["decode_s"]
            return {
                "server_completion": line["completion"],
                "server_prompt": line["prompt"],
                "server_cached": line["cached"],
                "server_queued_s": line["queued_s"],
                "server_prefill_s": line["prefill_s"],
                "server_decode_s": decode,
                "server_decode_tps": line["completion"] / decode if decode > 0 else None,
            }
        if time.perf_counter() >= deadline:
            return {"server_decode_tps": None}
        time.sleep(0.01)


def ask(server: ServerProcess, dialect: Dialect, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed turn in C{dialect}, with the server's log line for it."""
    offset = server.log_size()
    body = request_body(dialect, prompt, max_tokens)
    s = _client.stream(server.port, PATHS[dialect], body, timeout=REQUEST_TIMEOUT)
    got = trial_numbers(dialect, s)
    got.update(server_numbers(server, offset))
    got["dialect"] = dialect
    return got


def dialects_server(settings: Settings, workdir: Path) -> ServerProcess:
    """C{twistd -n ds4tw --parallel 1 --cache-ram-mb 0} on the run's model (or a scripted one)."""
    model = scripted_model(settings) if settings.engine == "scripted" else settings.model
    return ds4tw_twistd(
        dataclasses.replace(settings, model=model),
        workdir,
        "ds4tw-dialects",
        parallel=1,
        cache_ram_mb=0,
    )


def _record(t: Mapping[str, Any]) -> dict[str, Any]:
    """A trial as the JSON keeps it: the text's start only."""
    out = {k: v for k, v in t.items() if k != "text"}
    out["text_start"] = (t.get("text") or "")[:60]
    out["text_chars"] = len(t.get("text") or "")
    return out


def measure(
    settings: Settings, workdir: Path, *, mark: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """The whole part: warm-up, then L{Sizes.rounds} rounds of the four dialects."""
    sz = sizes(settings)
    prompts = Prompts(settings.seed + 22)
    server = dialects_server(settings, workdir)
    foreign = Foreign()
    rounds: list[dict[str, dict[str, Any]]] = []
    cpu: dict[str, dict[str, float]] = {d: {"main_s": 0.0, "other_s": 0.0} for d in DIALECTS}
    primes: list[dict[str, Any]] = []
    with running(server, READY_TIMEOUT) as ds:
        mark("dialects: warm-up")
        # Not counted: every dialect's path run once (imports, first templating).
        for d in DIALECTS:
            ask(ds, d, prompt_text(prompts, sz.prompt_words), 8)
        mark("dialects: rounds")
        for r in range(sz.rounds):
            prompt = prompt_text(prompts, sz.prompt_words)
            prime = ask(ds, BASELINE, prompt, 1)
            primes.append({k: prime.get(k) for k in ("status", "error", "server_prompt")})
            got: dict[str, dict[str, Any]] = {}
            for d in rotate(DIALECTS, r):
                _client.wait_idle(ds.port, timeout=60)
                noise = foreign.sample()
                before = _cpu.thread_times(ds.pid)
                got[d] = ask(ds, d, prompt, sz.max_tokens)
                for key, value in _cpu.split(ds.pid, before, _cpu.thread_times(ds.pid)).items():
                    cpu[d][key] += value
                got[d]["foreign_cores"] = foreign.since(noise)
                got[d]["round"] = r
            rounds.append(got)
    out = summarise(rounds, cpu)
    out.update(
        {
            "baseline": BASELINE,
            "dialects": list(DIALECTS),
            "paths": dict(PATHS),
            "framings": dict(FRAMINGS),
            "sizes": dataclasses.asdict(sz),
            "where": (
                f"twistd -n ds4tw --parallel 1 --cache-ram-mb 0 --threads {settings.threads} "
                f"--batch {settings.batch} on "
                + ("a scripted engine" if settings.engine == "scripted" else str(settings.model))
            ),
            "source": (
                "client-seen frame arrival times (SSE events, NDJSON lines) from timestamped "
                "socket reads; tokens from each dialect's own counter; the job's log line "
                "(server decode rate); /proc/PID/task/*/stat (reactor CPU)"
            ),
            "request": {d: request_body(d, "PROMPT", sz.max_tokens) for d in DIALECTS},
            "primes": primes,
            "foreign_cores": summary([t.get("foreign_cores") for r in rounds for t in r.values()]),
            "rounds": [{d: _record(t) for d, t in r.items()} for r in rounds],
            "notes": [
                "each round's prompt is sent once through the baseline first (1 token, not "
                "counted): the four find it in the slot, prefill about one token, and give "
                "the same greedy answer",
                "only the baseline can ask for ignore_eos: an answer may end before the limit, "
                "at the same token in all four",
            ],
        }
    )
    return out
