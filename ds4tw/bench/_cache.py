"""
The prompt cache: how long the next turn of a conversation
waits for its first token when its ~2,000-token prefix comes from a
retained slot, from the cache's memory, or from its disk after a restart,
against the same conversation's cold first turn; and how often an agent's
turns hit when more conversations alternate than there are slots.

One part, every figure a ratio against a baseline measured in the same
run, on servers of the run's model, threads, ctx and batch:

  1. TTFT by tier, on C{twistd -n ds4tw --parallel 2 --kv-disk-dir DIR}
     (the memory tier at its default size). Each measured conversation
     has its own system prompt of about L{PREFIX_TOKENS} tokens (sized
     from the server's own C{usage.prompt_tokens}, L{calibrate}) and a
     short user message per turn; every turn is a streamed chat
     completion (greedy, C{ignore_eos}, a few tokens), and appends the
     assistant's answer and a new user message, as an agent does:

       - turn 1, B{cold}: nothing of the prompt is anywhere;
       - turn 2 at once, from its B{slot} (the retained sequence);
       - after C{--parallel} other conversations (their turn 1 also counts
         as a cold trial) took every slot, turn 3 from B{memory};
       - after a restart (SIGTERM, which saves the slots and the memory
         tier to the directory, then a new server on the same
         C{--kv-disk-dir}), turn 4 from B{disk}. Before each disk turn
         the files are dropped from the OS page cache
         (C{posix_fadvise(DONTNEED)}), so the read is a read from the
         device, not a memcpy from the page cache.

     Each tier's TTFT is a median over the conversations, divided by the
     median cold TTFT. Every turn records the C{cached_tokens} the server
     reported (C{usage.prompt_tokens_details}), its job log line
     (C{cached=N (from ...)}, C{prefill=...}) and the delta of the
     C{ds4tw_prompt_cache_*} counters over it (L{source_of}): a tier's
     turn is B{proven} when exactly one hit from that source was counted,
     the reused tokens cover the previous turn's whole prompt and, from
     memory or disk, tokens were restored from that tier (L{proven}).
  2. Interleaved conversations: L{Sizes.conversations} conversations, each
     with its own ~2,000-token system prompt, round-robin for
     L{Sizes.turns} turns on two servers loaded at once, both
     C{--parallel 2}: the cache on (the memory tier at its default size,
     no disk) and off (C{--cache-ram-mb 0}: the slots only). The two
     see the same texts, turn by turn in alternating order (noise on the
     shared machine hits both alike), each conversation carrying its own
     server's answers. Reported per server: the hit rate (turns after a
     conversation's first whose C{cached_tokens} covered the previous
     turn's whole prompt) and a token rate (cached tokens, at most the
     previous prompt, over the previous prompts' tokens, L{hit_rates}),
     and the total prefill time (the job log lines' C{prefill=}, and
     the client's TTFT as a cross-check): cache on over cache off. The
     answers of the two servers are compared turn by turn too, as long as
     their prompts are the same (L{compare_answers}; greedy: what was
     reused should not change them).

Targets: memory hit <= 0.10 of cold, disk hit <= 0.25 of cold,
interleaved hit rate >= 90 %.

With the scripted engine (C{twistd ds4tw --model scripted:...} at the
run's pace: prefill takes time, a restore does not) everything runs the
same; its tokenizer is one token per character.

Covered by tests/unit/test_bench.py (the pure functions) and
tests/integration/test_bench_smoke.py (the scripted run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import _client
from ._batching import Foreign, scripted_model, words_for
from ._servers import READY_TIMEOUT, ServerProcess, ds4tw_twistd, running
from ._settings import Settings
from ._sse import delta_text, finish_reason, text_times, usage
from ._stats import ratio, summary
from ._workload import Prompts

#: Slots of every server of this part: fewer than the conversations.
PARALLEL = 2
#: The shared prefix (system prompt) of every conversation, in tokens.
PREFIX_TOKENS = 2000
#: Words of each user message.
USER_WORDS = 12
#: Per-request bound (seconds).
REQUEST_TIMEOUT = 300.0
#: How long the server that saves its cache at shutdown may take to exit.
SHUTDOWN_TIMEOUT = 180.0
#: How long to wait for a job's log line once its stream ended.
LOG_WAIT_S = 10.0
#: A cold turn may reuse the chat template's header from another
#: conversation's slot, nothing of substance: under 1/COLD_SHARE of its prompt.
COLD_SHARE = 20
#: The calibration prompts' system prompt lengths (words).
CALIBRATION_WORDS = (40, 160)

# The prompt cache's targets.
RAM_TARGET = 0.10
DISK_TARGET = 0.25
HIT_RATE_TARGET = 0.90

TIERS = ("cold", "slot", "ram", "disk")


@dataclass(frozen=True)
class Sizes:
    """What the part measures, for the full run or C{--quick}."""

    prefix_tokens: int
    #: Conversations measured through every tier (part 1).
    trials: int
    #: Conversations interleaved, and their turns (part 2).
    conversations: int
    turns: int
    #: Tokens of each answer.
    answer_tokens: int


def sizes(settings: Settings) -> Sizes:
    answer = 8 if settings.quick else 16
    turns = 3 if settings.quick else 4
    # The prefix, every turn's user message and answer must fit one slot.
    room = settings.ctx - 64 - turns * (answer + 48)
    # The quick run's prefix stays above the cache's 512-token minimum.
    prefix = min(700 if settings.quick else PREFIX_TOKENS, room)
    if settings.quick:
        return Sizes(prefix, trials=2, conversations=3, turns=turns, answer_tokens=answer)
    return Sizes(prefix, trials=3, conversations=4, turns=turns, answer_tokens=answer)


# -- pure arithmetic -------------------------------------------------------


def calibrate(points: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """
    C{(overhead, tokens_per_word)} of a chat prompt from C{(system words,
    prompt tokens)} measurements: a line through the first and last.
    """
    (w1, t1), (w2, t2) = points[0], points[-1]
    if w2 == w1:
        raise ValueError("calibration needs two different lengths")
    per_word = (t2 - t1) / (w2 - w1)
    if per_word <= 0:
        raise ValueError(f"prompt tokens did not grow with the words: {list(points)}")
    return t1 - per_word * w1, per_word


def prefix_words(tokens: int, overhead: float, per_word: float) -> int:
    """Words of a system prompt whose chat prompt has about C{tokens} tokens."""
    return words_for(max(1, round(tokens - overhead)), per_word)


def chat_body(messages: Sequence[Mapping[str, str]], max_tokens: int) -> dict[str, Any]:
    """A streamed, greedy, fixed-length ds4tw chat completion that reports its usage."""
    return {
        "model": "bench",
        "messages": [dict(m) for m in messages],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "repeat_penalty": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class Conversation:
    """An agent's conversation: a system prompt, then a user message per turn."""

    system: str
    users: Sequence[str]
    messages: list[dict[str, str]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)

    @property
    def turn(self) -> int:
        """Turns answered so far."""
        return len(self.answers)

    def next_messages(self) -> list[dict[str, str]]:
        """The whole conversation to send for the next turn (the history, then a new message)."""
        if not self.messages:
            self.messages.append({"role": "system", "content": self.system})
        if len(self.messages) % 2 == 1:  # system, (user, assistant)*: a user message next
            self.messages.append({"role": "user", "content": self.users[self.turn]})
        return list(self.messages)

    def answered(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self.answers.append(text)


def conversations(prompts: Prompts, n: int, words: int, turns: int) -> list[Conversation]:
    """C{n} conversations, each with its own system prompt (distinct from its first words)."""
    return [
        Conversation(prompts.words(words), [prompts.words(USER_WORDS) for _ in range(turns)])
        for _ in range(n)
    ]


def answer_text(events: Sequence[Any]) -> str:
    """The content a chat stream generated."""
    return "".join(
        got[1] for got in (delta_text(e) for e in events) if got is not None and got[0] == "content"
    )


DONE_LINE = re.compile(
    r"done: finish=(?P<finish>\S+) prompt=(?P<prompt>\d+) cached=(?P<cached>\d+)"
    r"(?: \(from (?P<source>\w+)\))? completion=(?P<completion>\d+) "
    r"queued=(?P<queued>[0-9.]+)s prefill=(?P<prefill>[0-9.]+)s decode=(?P<decode>[0-9.]+)s"
)


def parse_done_lines(text: str) -> list[dict[str, Any]]:
    """The C{done:} log line in C{text}: tokens, where its cached prefix came from, times."""
    out = []
    for line in text.splitlines():
        m = DONE_LINE.search(line)
        if m is None:
            continue
        out.append(
            {
                "finish": m.group("finish"),
                "prompt": int(m.group("prompt")),
                "cached": int(m.group("cached")),
                "source": m.group("source"),
                "completion": int(m.group("completion")),
                "queued_s": float(m.group("queued")),
                "prefill_s": float(m.group("prefill")),
                "decode_s": float(m.group("decode")),
                "line": line.strip(),
            }
        )
    return out


#: Counters and gauges of the prompt cache on /metrics: key, label.
_LABELLED = {
    "ds4tw_prompt_cache_hits_total": ("hits", "source"),
    "ds4tw_prompt_cache_restored_tokens_total": ("restored_tokens", "tier"),
    "ds4tw_prompt_cache_saves_total": ("saves", "tier"),
    "ds4tw_prompt_cache_evictions_total": ("evictions", "tier"),
    "ds4tw_prompt_cache_refused_total": ("refused", "tier"),
    "ds4tw_prompt_cache_rejected_files_total": ("rejected", "reason"),
    "ds4tw_prompt_cache_bytes": ("bytes", "tier"),
    "ds4tw_prompt_cache_entries": ("entries", "tier"),
}
_SCALARS = {
    "ds4tw_prompt_cache_misses_total": "misses",
    "ds4tw_prompt_cache_write_errors_total": "write_errors",
}
#: Gauges: a delta of them is the change, C{after} has their value.
GAUGES = ("bytes", "entries")


def parse_cache_metrics(text: str) -> dict[str, Any]:
    """The C{ds4tw_prompt_cache_*} samples of ds4tw's /metrics, by key and label."""
    out: dict[str, Any] = {key: {} for key, _ in _LABELLED.values()}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in _LABELLED:
                key, label = _LABELLED[s.name]
                out[key][s.labels.get(label, "")] = s.value
            elif s.name in _SCALARS:
                out[_SCALARS[s.name]] = s.value
    return out


def metrics_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What changed between two L{parse_cache_metrics} samples (labels of either)."""
    out: dict[str, Any] = {}
    for key in {*before, *after}:
        a, b = before.get(key, {}), after.get(key, {})
        if isinstance(a, Mapping) or isinstance(b, Mapping):
            a, b = a or {}, b or {}
            out[key] = {k: b.get(k, 0.0) - a.get(k, 0.0) for k in sorted({*a, *b})}
        else:
            out[key] = (b or 0.0) - (a or 0.0)
    return out


def source_of(delta: Mapping[str, Any]) -> str | None:
    """
    Where the one request between two /metrics samples took its prefix
    from (a source of C{ds4tw_prompt_cache_hits_total}), C{"miss"}, or
    None when the counters do not say one thing (several requests, none).
    """
    hits = {k: v for k, v in (delta.get("hits") or {}).items() if v}
    misses = delta.get("misses") or 0
    if len(hits) == 1 and not misses and next(iter(hits.values())) == 1:
        return next(iter(hits))
    if not hits and misses == 1:
        return "miss"
    return None


def proven(
    tier: str,
    source: str | None,
    cached: int | None,
    prompt_tokens: int | None,
    previous_prompt: int | None,
    restored: Mapping[str, float] | None = None,
) -> bool:
    """
    Does a turn measured as C{tier} come from where it claims? Cold: no
    hit from the cache's tiers and under 1/L{COLD_SHARE} of the prompt
    reused (a template header another slot shares). A hit: /metrics
    counted exactly one hit from C{tier}, the reused tokens cover the
    previous turn's whole prompt, and (memory, disk) that tier restored
    tokens.
    """
    if cached is None or prompt_tokens is None:
        return False
    if tier == "cold":
        return source in ("miss", "slot", "copy") and cached * COLD_SHARE < prompt_tokens
    if source != tier or previous_prompt is None or cached < previous_prompt:
        return False
    return tier not in ("ram", "disk") or (restored or {}).get(tier, 0.0) > 0


def hit_rates(conversations: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """
    Over the turns after each conversation's first: the share that reused
    at least the previous turn's whole prompt (C{cached_tokens >=} its
    C{prompt_tokens}), and the token rate: cached tokens (at most the
    previous prompt) over the previous prompts' tokens, the tokens that
    were in an earlier prompt of the same conversation. A turn without
    numbers (an error) counts as a miss.
    """
    turns = hits = missing = 0
    reusable = capped = cached_all = 0
    for conv in conversations:
        for prev, cur in itertools.pairwise(conv):
            turns += 1
            p, c = prev.get("prompt_tokens"), cur.get("cached_tokens")
            if p is None or c is None:
                missing += 1
                continue
            hits += c >= p
            reusable += p
            capped += min(c, p)
            cached_all += c
    return {
        "turns": turns,
        "hits": hits,
        "missing": missing,
        "hit_rate": ratio(hits, turns),
        "token_rate": ratio(capped, reusable),
        "cached_over_reusable": ratio(cached_all, reusable),
    }


def compare_answers(
    a: Sequence[Sequence[Mapping[str, Any]]], b: Sequence[Sequence[Mapping[str, Any]]]
) -> dict[str, Any]:
    """
    Two servers' answers to the same conversations, turn by turn, while
    their prompts are the same: up to and including a conversation's
    first turn whose answers differ (after it, each server carries its
    own answer, so the prompts differ too). Greedy decoding on the same
    prompt should answer the same whatever was reused.
    """
    compared = identical = 0
    divergences = []
    for c, (ca, cb) in enumerate(zip(a, b, strict=True)):
        for x, y in zip(ca, cb, strict=True):
            compared += 1
            if x.get("answer") == y.get("answer"):
                identical += 1
                continue
            divergences.append(
                {
                    "conversation": c,
                    "turn": x.get("turn"),
                    "answers": [x.get("answer"), y.get("answer")],
                    "cached_tokens": [x.get("cached_tokens"), y.get("cached_tokens")],
                    "sources": [x.get("source"), y.get("source")],
                }
            )
            break
    return {"compared": compared, "identical": identical, "divergences": divergences}


def tier_ratios(trials: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """
    Each tier's median TTFT over the median cold TTFT, and the median of
    per-conversation ratios (a tier's turn over the same conversation's
    cold turn) as a cross-check.
    """
    cold = summary([t.get("ttft_s") for t in trials.get("cold", [])])["median"]
    by_conv = {t.get("conversation"): t.get("ttft_s") for t in trials.get("cold", [])}
    out: dict[str, Any] = {}
    for tier in TIERS[1:]:
        got = trials.get(tier, [])
        median = summary([t.get("ttft_s") for t in got])["median"]
        paired = [ratio(t.get("ttft_s"), by_conv.get(t.get("conversation"))) for t in got]
        out[tier] = {
            "over_cold": ratio(median, cold),
            "paired_over_cold": summary(paired),
        }
    return out


# -- the servers -----------------------------------------------------------


def cache_server(
    settings: Settings,
    workdir: Path,
    name: str,
    *,
    scripted_model: str | None,
    cache_ram_mb: int | None = None,
    kv_disk_dir: Path | None = None,
) -> ServerProcess:
    """C{twistd -n ds4tw --parallel 2} on the run's model (or C{--model scripted:...})."""
    s = dataclasses.replace(settings, model=scripted_model or settings.model)
    return ds4tw_twistd(
        s,
        workdir,
        name,
        parallel=PARALLEL,
        cache_ram_mb=cache_ram_mb,
        kv_disk_dir=kv_disk_dir,
    )


def cache_metrics(server: ServerProcess) -> dict[str, Any]:
    status, body = _client.get(server.port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return parse_cache_metrics(body.decode("utf-8", errors="replace"))


def _done_line(server: ServerProcess, offset: int) -> dict[str, Any] | None:
    """The C{done:} line the last job wrote after C{offset} (waits up to L{LOG_WAIT_S})."""
    deadline = time.perf_counter() + LOG_WAIT_S
    while time.perf_counter() < deadline:
        lines = parse_done_lines(server.log_since(offset))
        if lines:
            return lines[-1]
        time.sleep(0.02)
    return None


def _cache_files(directory: Path) -> list[Path]:
    """
    The prompt cache's files in its C{--kv-disk-dir}, a directory of the
    bench's own: every file but the hidden ones a save is still writing.
    """
    return [p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")]


def drop_page_cache(directory: Path) -> int:
    """
    Drop the cache files' pages from the OS page cache (they are clean:
    written with fsync), so that the next read comes from the device.
    Returns the files dropped.
    """
    n = 0
    for path in _cache_files(directory):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def _disk_files(directory: Path) -> dict[str, Any]:
    sizes = [p.stat().st_size for p in _cache_files(directory)]
    return {"files": len(sizes), "bytes": sum(sizes)}


# -- the measurements ------------------------------------------------------


def turn(
    server: ServerProcess, conv: Conversation, max_tokens: int, foreign: Foreign | None = None
) -> dict[str, Any]:
    """
    The next turn of C{conv} on an idle server: client TTFT, usage, the
    job's log line and the prompt cache counters' delta over it.
    """
    _client.wait_idle(server.port, timeout=120)
    offset = server.log_size()
    before = cache_metrics(server)
    noise = foreign.sample() if foreign is not None else None
    s = _client.stream(
        server.port,
        "/v1/chat/completions",
        chat_body(conv.next_messages(), max_tokens),
        timeout=REQUEST_TIMEOUT,
    )
    cores = foreign.since(noise) if foreign is not None and noise is not None else None
    line = _done_line(server, offset)
    delta = metrics_delta(before, cache_metrics(server))
    times = text_times(s.events, None)
    u = usage(s.events) or {}
    text = answer_text(s.events)
    conv.answered(text)
    return {
        "turn": conv.turn,
        "status": s.status,
        "error": s.error,
        "ttft_s": times[0] - s.sent if times else None,
        "prompt_tokens": u.get("prompt_tokens"),
        "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens"),
        "completion_tokens": u.get("completion_tokens"),
        "finish_reason": finish_reason(s.events),
        "answer": text,
        "log": line,
        "metrics": delta,
        "source": source_of(delta),
        "foreign_cores": cores,
    }


def calibration(servers: Sequence[ServerProcess], prompts: Prompts, target: int) -> dict[str, Any]:
    """
    Chat prompts of two system prompt lengths on each server (also their
    warm-up: a server's first requests run code paths for the first
    time); the first server's C{usage.prompt_tokens} fit the words of a
    C{target}-token prompt.
    """
    points: list[tuple[int, int]] = []
    for words in CALIBRATION_WORDS:
        conv = Conversation(prompts.words(words), [prompts.words(USER_WORDS)])
        for i, server in enumerate(servers):
            got = turn(server, dataclasses.replace(conv, messages=[], answers=[]), 1)
            if got["prompt_tokens"] is None:
                raise RuntimeError(f"calibration request failed: {got['status']} {got['error']}")
            if i == 0:
                points.append((words, int(got["prompt_tokens"])))
    overhead, per_word = calibrate(points)
    return {
        "points": points,
        "overhead_tokens": overhead,
        "tokens_per_word": per_word,
        "words": prefix_words(target, overhead, per_word),
    }


def _record(got: dict[str, Any], tier: str, conversation: int, previous: int | None) -> None:
    got["tier"] = tier
    got["conversation"] = conversation
    got["previous_prompt_tokens"] = previous
    got["proven"] = proven(
        tier,
        got["source"],
        got["cached_tokens"],
        got["prompt_tokens"],
        previous,
        got["metrics"].get("restored_tokens"),
    )


def tiers(
    settings: Settings,
    sz: Sizes,
    workdir: Path,
    prompts: Prompts,
    *,
    model: str | None,
    mark: Callable[[str], None],
) -> dict[str, Any]:
    """Part 1: the TTFT of a cold turn, and of the next turns from a slot, memory and disk."""
    # Absolute: the servers run in C{workdir}.
    disk_dir = (workdir / "ds4tw-cache-kv").resolve()
    shutil.rmtree(disk_dir, ignore_errors=True)
    trials: dict[str, list[dict[str, Any]]] = {tier: [] for tier in TIERS}
    foreign = Foreign()
    out: dict[str, Any] = {"trials": trials, "kv_disk_dir": str(disk_dir)}
    try:
        first = cache_server(
            settings, workdir, "ds4tw-cache", scripted_model=model, kv_disk_dir=disk_dir
        )
        with running(first, READY_TIMEOUT) as ds:
            mark("cache: calibrate")
            cal = calibration([ds], prompts, sz.prefix_tokens)
            out["calibration"] = cal
            measured = conversations(prompts, sz.trials, cal["words"], 4)
            # Other conversations, as many as slots: after them no slot holds
            # a measured one. Their turn 1 is a cold trial too.
            fillers = conversations(prompts, PARALLEL, cal["words"], 1)
            mark("cache: cold and slot")
            for i, conv in enumerate(measured):
                cold = turn(ds, conv, sz.answer_tokens, foreign)
                _record(cold, "cold", i, None)
                trials["cold"].append(cold)
                got = turn(ds, conv, sz.answer_tokens, foreign)
                _record(got, "slot", i, cold["prompt_tokens"])
                trials["slot"].append(got)
            for j, conv in enumerate(fillers):
                cold = turn(ds, conv, sz.answer_tokens, foreign)
                _record(cold, "cold", len(measured) + j, None)
                trials["cold"].append(cold)
            mark("cache: memory")
            for i, conv in enumerate(measured):
                got = turn(ds, conv, sz.answer_tokens, foreign)
                _record(got, "ram", i, trials["slot"][i]["prompt_tokens"])
                trials["ram"].append(got)
            out["metrics_before_restart"] = cache_metrics(ds)
            mark("cache: restart")
            offset = ds.log_size()
            t0 = time.perf_counter()
            code = ds.stop(timeout=SHUTDOWN_TIMEOUT)
            out["shutdown"] = {
                "s": time.perf_counter() - t0,
                "exit_code": code,
                "log": [
                    line.strip()
                    for line in ds.log_since(offset).splitlines()
                    if "prompt cache" in line or "shut down" in line
                ],
                "disk": _disk_files(disk_dir),
            }
        second = cache_server(
            settings, workdir, "ds4tw-cache-restart", scripted_model=model, kv_disk_dir=disk_dir
        )
        t0 = time.perf_counter()
        with running(second, READY_TIMEOUT) as ds:
            out["restart"] = {
                "ready_s": time.perf_counter() - t0,
                "log": [
                    line.strip()
                    for line in ds.log_tail(20000).splitlines()
                    if "prompt cache" in line
                ],
            }
            # Warm-up (not counted): a short prompt shares nothing but the header.
            turn(ds, Conversation(prompts.words(USER_WORDS), [prompts.words(USER_WORDS)]), 2)
            mark("cache: disk")
            dropped = []
            for i, conv in enumerate(measured):
                dropped.append(drop_page_cache(disk_dir))
                got = turn(ds, conv, sz.answer_tokens, foreign)
                _record(got, "disk", i, trials["ram"][i]["prompt_tokens"])
                trials["disk"].append(got)
            out["page_cache_dropped_files"] = dropped
            out["metrics_end"] = cache_metrics(ds)
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    out["ttft_s"] = {tier: summary([t["ttft_s"] for t in got]) for tier, got in trials.items()}
    out["cached_tokens"] = {
        tier: summary([t["cached_tokens"] for t in got]) for tier, got in trials.items()
    }
    out["prompt_tokens"] = summary([t["prompt_tokens"] for t in trials["cold"]])
    out["ratios"] = tier_ratios(trials)
    out["proven"] = {tier: [t["proven"] for t in got] for tier, got in trials.items()}
    out["foreign_cores"] = {
        tier: summary([t["foreign_cores"] for t in got]) for tier, got in trials.items()
    }
    return out


def _totals(turns: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Prefill time (log) and TTFT (client) summed over all turns, and over the later ones."""

    def total(key: str, later: bool) -> float | None:
        values: list[float | None] = [
            (t["log"] or {}).get("prefill_s") if key == "prefill" else t.get("ttft_s")
            for conv in turns
            for t in conv[1 if later else 0 :]
        ]
        clean = [v for v in values if v is not None]
        return float(sum(clean)) if len(clean) == len(values) else None

    return {
        "prefill_s": total("prefill", False),
        "prefill_later_s": total("prefill", True),
        "ttft_s": total("ttft", False),
        "ttft_later_s": total("ttft", True),
    }


def interleaved(
    settings: Settings,
    sz: Sizes,
    workdir: Path,
    prompts: Prompts,
    *,
    model: str | None,
    mark: Callable[[str], None],
) -> dict[str, Any]:
    """Part 2: conversations round-robin on a server with the cache and one without."""
    names = ("on", "off")
    on = cache_server(settings, workdir, "ds4tw-cache-on", scripted_model=model)
    off = cache_server(settings, workdir, "ds4tw-cache-off", scripted_model=model, cache_ram_mb=0)
    foreign = Foreign()
    with running(on, READY_TIMEOUT) as a, running(off, READY_TIMEOUT) as b:
        servers = {"on": a, "off": b}
        mark("cache: interleaved calibrate")
        cal = calibration([a, b], prompts, sz.prefix_tokens)
        template = conversations(prompts, sz.conversations, cal["words"], sz.turns)
        convs = {
            name: [dataclasses.replace(c, messages=[], answers=[]) for c in template]
            for name in names
        }
        turns: dict[str, list[list[dict[str, Any]]]] = {
            name: [[] for _ in template] for name in names
        }
        start = {name: cache_metrics(servers[name]) for name in names}
        mark("cache: interleaved")
        for k, c in enumerate(c for _ in range(sz.turns) for c in range(sz.conversations)):
            for name in names[k % 2 :] + names[: k % 2]:
                got = turn(servers[name], convs[name][c], sz.answer_tokens, foreign)
                got["conversation"] = c
                turns[name][c].append(got)
        end = {name: cache_metrics(servers[name]) for name in names}
    out: dict[str, Any] = {
        "calibration": cal,
        "conversations": sz.conversations,
        "turns": sz.turns,
    }
    for name in names:
        out[name] = {
            **hit_rates(turns[name]),
            **_totals(turns[name]),
            "metrics": metrics_delta(start[name], end[name]),
            "prompt_tokens": summary([t["prompt_tokens"] for conv in turns[name] for t in conv]),
            "ttft_each_s": summary([t["ttft_s"] for conv in turns[name] for t in conv]),
            "turn_log": turns[name],
        }
    out["answers"] = compare_answers(turns["on"], turns["off"])
    out["prefill_on_over_off"] = ratio(out["on"]["prefill_s"], out["off"]["prefill_s"])
    out["prefill_later_on_over_off"] = ratio(
        out["on"]["prefill_later_s"], out["off"]["prefill_later_s"]
    )
    out["ttft_on_over_off"] = ratio(out["on"]["ttft_s"], out["off"]["ttft_s"])
    out["foreign_cores"] = summary(
        [t["foreign_cores"] for name in names for conv in turns[name] for t in conv]
    )
    return out


def measure(
    settings: Settings, workdir: Path, *, mark: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """The whole part; a failure of either half is recorded in C{errors}, the other still runs."""
    sz = sizes(settings)
    scripted = settings.engine == "scripted"
    model = scripted_model(settings) if scripted else None
    notes: list[str] = []
    if scripted:
        notes.append(
            "scripted engine: one token per character; prefill is paced, a restore is instant"
        )
    out: dict[str, Any] = {
        "parallel": PARALLEL,
        "sizes": dataclasses.asdict(sz),
        "source": (
            "client-seen SSE TTFT of streamed chat completions; usage.prompt_tokens_details."
            "cached_tokens; the job log line (cached=N (from ...), prefill=); "
            "ds4tw_prompt_cache_* counter deltas on /metrics around every turn"
        ),
        "where": (
            f"twistd -n ds4tw --parallel {PARALLEL} (batch {settings.batch}, ctx {settings.ctx}, "
            f"threads {settings.threads}): tiers with --kv-disk-dir (memory tier at its default), "
            "restarted on the same directory; interleaved: the default memory tier vs "
            "--cache-ram-mb 0, both loaded, turns alternating"
        ),
        "notes": notes,
        "errors": [],
        "tiers": None,
        "interleaved": None,
    }
    for seed, (key, f) in enumerate((("tiers", tiers), ("interleaved", interleaved))):
        try:
            prompts = Prompts(settings.seed + 10 + seed)
            out[key] = f(settings, sz, workdir, prompts, model=model, mark=mark)
        except Exception as e:
            out["errors"].append(f"{key}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    if out["errors"] and not out["tiers"] and not out["interleaved"]:
        raise RuntimeError("; ".join(e.splitlines()[0] for e in out["errors"]))
    return out
