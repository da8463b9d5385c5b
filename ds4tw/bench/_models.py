"""
Several models in one server (issue 21): what a model's load costs the
request that waits for it, whether the memory budget holds the server's
RSS, and what two models decoding at once cost against one.

Every server of the part is C{twistd -n ds4tw --models FILE
--cache-ram-mb 0} with the run's threads and batch, the models file
naming the run's model (the demo model by default) three times
(L{NAMES}), each with its own C{ctx} (L{CTX}: their memory differs a
little) and C{parallel} L{PARALLEL}. The memory budget
(C{--models-memory-mb}) fits any two of them and not all three
(L{budget_mb}, from the engine's own estimate in this process: a
vocabulary-only load, no compute; the loads' measured memory is checked
against it afterwards, L{fits_two}). Three measurements, each against a
baseline measured beside it:

  1. B{load and first token}: on a fresh server per trial (so a model
     can be one never loaded), the TTFT of a short streamed chat (a few
     tokens) to a B{cold} model (never loaded, room free: the TTFT
     includes its load), a B{warm} one (loaded: the baseline), one that
     had to B{evict} another first (the budget full: the least recently
     used idle model is unloaded, then this one loads), and one evicted
     earlier and B{reload}ed, evicting the other. The trials rotate the
     names over the roles and alternate the order of the warm requests
     (L{load_plan}); each request is proven by the
     C{ds4tw_model_loads_total} and C{ds4tw_model_unloads_total} deltas
     around it (the load it claims, the victim the LRU order predicts,
     nothing else), and C{ds4tw_model_load_seconds} gives the load's own
     time beside the TTFT. The model file is the same for the three
     names, so after the first load ever its pages come from the OS page
     cache: a load from the device adds the read.
  2. B{the budget held}: on a fresh server, its RSS with nothing loaded
     first (the process baseline: Python, the llama.cpp libraries, the
     three vocabulary-only models), then a request mix over the three
     names (L{mix_plan}: each name as often, shuffled with the run's
     seed) from L{CLIENTS} concurrent clients, while a thread reads the
     server's C{/proc/PID/status} every L{RSS_INTERVAL_S} (VmRSS,
     RssAnon, RssFile) and another its C{/health} (C{memory.used_bytes},
     how many models are in memory) every L{HEALTH_INTERVAL_S}. The
     peak is the kernel's own high-water mark (VmHWM, reset when the mix
     starts through C{/proc/PID/clear_refs}), so a spike between two
     samples counts too. The claim tested: peak RSS <= baseline + budget
     + L{MARGIN_MB}; the margin observed (peak - baseline - budget) is
     reported. Every request must be answered (200, no error) and every
     stream whole (its final frame, C{[DONE]}, all the tokens asked for).
  3. B{two models decoding at once}: aggregate decode tok/s of one
     stream on one model (the baseline), two streams on that model (two
     slots, batched in one step) and one stream on each of two models at
     once (the models take turns on the one model thread, one step
     each); long greedy C{ignore_eos} completions, the three kinds of
     trial rotating round by round, each ratio paired with the round's
     one-stream trial. Expected: two models at once about one model's
     speed in all (each stream half of it), not the collapse of two ggml
     threads or processes (docs/performance.md, "One ggml thread,
     always"). This server has no budget (both models stay loaded
     whatever their measured size), and no trial may load a model.

Needs the real model: a models file serves GGUF files only.

Covered by tests/unit/test_bench_models.py (the pure functions, and
the parsers against the metrics and log lines of a fleet of scripted
engines) and tests/integration/test_bench_smoke.py (a quick run on the
demo model).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from . import _client
from ._batching import Foreign, StreamTimes, aggregate_rate, whole
from ._servers import READY_TIMEOUT, ServerProcess, ds4tw_twistd, running
from ._settings import Settings
from ._sse import delta_text, finish_reason, saw_done, text_times, usage
from ._stats import ratio, summary
from ._throughput import trial_numbers
from ._workload import Prompts, completion_body

#: The names the models file gives the one model file, and each one's ctx.
NAMES = ("bench-a", "bench-b", "bench-c")
CTX = (1024, 1536, 2048)
#: Slots of every model: the decode part's batched trial runs two streams on one.
PARALLEL = 2
#: Concurrent clients of the request mix.
CLIENTS = 2
#: Tokens of a TTFT request (a load's trial): only the first one is timed.
TTFT_TOKENS = 4
#: How often the RSS and /health samplers read (seconds).
RSS_INTERVAL_S = 0.05
HEALTH_INTERVAL_S = 0.25
#: Per-request bound (seconds).
REQUEST_TIMEOUT = 300.0
#: The model states that take memory (what the budget counts).
IN_MEMORY = ("loading", "ready", "unloading")
_MIB = 2**20

# The targets.
#: What the server's RSS may exceed its nothing-loaded RSS plus the budget
#: by: what llama.cpp allocates outside the buffers it reports (the
#: backend's threads, the context's own structures), the engine objects,
#: and freed memory the C heap has not handed back.
MARGIN_MB = 64.0
#: Two models decoding at once, aggregate, over one model alone: their
#: turns on one thread cost almost nothing (a collapse would be ~0.3).
TWO_MODELS_TARGET = 0.90

ROLES = ("warm", "cold", "evict", "reload")
CONFIGS = ("one", "batched", "two_models")


@dataclass(frozen=True)
class Sizes:
    """What the part measures, for the full run or C{--quick}."""

    #: Fresh servers of the load part, one trial each.
    load_trials: int
    #: Requests of the mix, and the tokens of each.
    mix_requests: int
    mix_tokens: int
    #: Seconds of RSS samples with nothing loaded.
    baseline_s: float
    #: Tokens of each decode stream, and the rounds of the three trials.
    decode_tokens: int
    decode_rounds: int
    #: Words of every prompt.
    prompt_words: int


def sizes(settings: Settings) -> Sizes:
    if settings.quick:
        return Sizes(
            load_trials=2,
            mix_requests=8,
            mix_tokens=8,
            baseline_s=0.5,
            decode_tokens=32,
            decode_rounds=2,
            prompt_words=12,
        )
    return Sizes(
        load_trials=5,
        mix_requests=30,
        mix_tokens=24,
        baseline_s=1.0,
        decode_tokens=200,
        decode_rounds=4,
        prompt_words=16,
    )


# -- pure arithmetic -------------------------------------------------------


def models_file(model_path: str) -> str:
    """The models file: L{NAMES}, one table each, the same file at each one's L{CTX}."""
    # A JSON string is a TOML basic string (the same escapes).
    path = json.dumps(model_path)
    tables = [
        f"[models.{name}]\npath = {path}\nctx = {ctx}\nparallel = {PARALLEL}\n"
        for name, ctx in zip(NAMES, CTX, strict=True)
    ]
    return "\n".join(tables)


def budget_mb(memory: Sequence[int]) -> int:
    """
    A budget (MiB) that fits any two of three models of C{memory} bytes
    and not all three: the two largest and half the smallest, so that
    measured sizes a little off the estimates still fit two.
    """
    a, b, c = sorted(memory)
    return int((b + c + a / 2) / _MIB + 0.999)


def fits_two(budget: int, memory: Sequence[int]) -> bool:
    """Whether C{budget} bytes hold any two of the three models, and not the three."""
    a, b, c = sorted(memory)
    return b + c <= budget < a + b + c


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


def load_plan(trial: int) -> list[tuple[str, str]]:
    """
    The requests of one load trial, C{(role, name)}, on a fresh server
    whose budget fits two: two cold loads, warm requests, an eviction of
    a never-loaded model and the reload of the model it evicted. The
    names rotate over the roles trial by trial, and odd trials ask the
    warm ones in the other order (so the other one is evicted).
    """
    x, y, z = rotate(NAMES, trial)
    if trial % 2 == 0:
        head = [("cold", x), ("warm", x), ("cold", y), ("warm", y), ("warm", x)]
    else:
        head = [("cold", x), ("cold", y), ("warm", y), ("warm", x), ("warm", y)]
    # The least recently used of x and y (the one before the last warm
    # request) is evicted for z, then reloaded.
    victim = head[-2][1]
    return [*head, ("evict", z), ("warm", z), ("reload", victim)]


def expected_victims(plan: Sequence[tuple[str, str]], room: int = 2) -> list[str | None]:
    """
    The model each request of C{plan} should evict, by least recent use
    with room for C{room} models (None: none), and a check that each
    request's role is what the state makes it.
    """
    loaded: list[str] = []  # least recently used first
    seen: set[str] = set()
    out: list[str | None] = []
    for role, name in plan:
        victim = None
        if name in loaded:
            actual = "warm"
            loaded.remove(name)
        elif len(loaded) < room:
            actual = "reload" if name in seen else "cold"
        else:
            victim = loaded.pop(0)
            actual = "reload" if name in seen else "evict"
        if actual != role:
            raise ValueError(f"{name} would be {actual}, not {role}, in {list(plan)}")
        loaded.append(name)
        seen.add(name)
        out.append(victim)
    return out


def mix_plan(n: int, seed: int) -> list[str]:
    """C{n} requests over L{NAMES}, each name as often (within one), shuffled with C{seed}."""
    names = [NAMES[i % len(NAMES)] for i in range(n)]
    random.Random(seed).shuffle(names)
    return names


def chat_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A streamed, greedy, fixed-length chat completion to C{model} that reports its usage."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "repeat_penalty": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


#: The per-model series of ds4tw's /metrics this part reads, by key.
_PER_MODEL = {
    "ds4tw_model_loaded": "loaded",
    "ds4tw_model_loading": "loading",
    "ds4tw_model_load_seconds": "load_s",
    "ds4tw_model_loads_total": "loads",
    "ds4tw_model_memory_bytes": "memory_bytes",
}


def parse_model_metrics(text: str) -> dict[str, Any]:
    """
    The per-model series of ds4tw's /metrics: C{{key: {model: value}}}
    for L{_PER_MODEL}, C{evicted} and C{idle} unloads by model, and the
    budget (None without one).
    """
    out: dict[str, Any] = {key: {} for key in (*_PER_MODEL.values(), "evicted", "idle")}
    out["budget_bytes"] = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in _PER_MODEL:
                out[_PER_MODEL[s.name]][s.labels["model"]] = s.value
            elif s.name == "ds4tw_model_unloads_total":
                out.setdefault(s.labels["reason"], {})[s.labels["model"]] = s.value
            elif s.name == "ds4tw_models_memory_budget_bytes":
                out["budget_bytes"] = s.value
    return out


def load_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """The loads and the evictions between two L{parse_model_metrics}, by model (non-zero)."""
    out: dict[str, dict[str, int]] = {}
    for key in ("loads", "evicted", "idle"):
        a, b = before.get(key) or {}, after.get(key) or {}
        changed = {m: int(b.get(m, 0) - a.get(m, 0)) for m in sorted({*a, *b})}
        out[key] = {m: d for m, d in changed.items() if d}
    return out


def proven(role: str, name: str, victim: str | None, delta: Mapping[str, Any]) -> bool:
    """
    Did the request do what its role says: warm, no load; cold, one load
    of C{name}; evict or reload, one load of C{name} and one eviction of
    C{victim} (and nothing else, in all cases).
    """
    loads, evicted = delta.get("loads") or {}, delta.get("evicted") or {}
    if delta.get("idle"):
        return False
    if role == "warm":
        return not loads and not evicted
    want = {victim: 1} if victim is not None else {}
    return loads == {name: 1} and evicted == want


LOADED_LINE = re.compile(
    r"ds4tw: (?P<model>\S+) loaded in (?P<s>[0-9.]+)s: (?P<total>[0-9.]+) MiB "
    r"\(weights (?P<weights>[0-9.]+), KV (?P<kv>[0-9.]+), compute (?P<compute>[0-9.]+), "
    r"prompt cache (?P<cache>[0-9.]+)\)"
)
EVICT_LINE = re.compile(
    r"ds4tw: unloading (?P<victim>\S+) \(unused for [0-9.]+s, (?P<mib>[0-9.]+) MiB\) "
    r"to make room for (?P<model>\S+)"
)


def parse_load_lines(text: str) -> list[dict[str, Any]]:
    """
    The server log's loads (C{X loaded in N.NNs: M MiB (weights ...)}) and
    evictions (C{unloading V (...) to make room for X}), in order.
    """
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        m = LOADED_LINE.search(line)
        if m is not None:
            mib = {k: float(m.group(k)) for k in ("total", "weights", "kv", "compute", "cache")}
            out.append(
                {
                    "event": "loaded",
                    "model": m.group("model"),
                    "s": float(m.group("s")),
                    **{f"{k}_mib": v for k, v in mib.items()},
                }
            )
            continue
        m = EVICT_LINE.search(line)
        if m is not None:
            out.append(
                {
                    "event": "evicted",
                    "model": m.group("victim"),
                    "for": m.group("model"),
                    "mib": float(m.group("mib")),
                }
            )
    return out


def parse_status(text: str) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of a C{/proc/PID/status}, in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def in_memory(health: Mapping[str, Any], states: Sequence[str] = IN_MEMORY) -> int:
    """How many of a /health's models are in C{states} (default: loading, loaded or unloading)."""
    return sum(1 for m in health.get("models") or [] if m.get("state") in states)


def stream_whole(got: Mapping[str, Any], max_tokens: int) -> bool:
    """
    A chat stream that ended as it should: 200, no error, its final
    frame (C{[DONE]}, a finish reason), some text, and every token asked
    for (C{ignore_eos}).
    """
    return (
        got.get("status") == 200
        and not got.get("error")
        and bool(got.get("done"))
        and got.get("finish_reason") is not None
        and bool(got.get("text"))
        and got.get("tokens") == max_tokens
    )


def role_summary(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """
    Per role: the TTFT, the load's own seconds, the rest (TTFT - load),
    and which requests were proven; the medians' ratios over warm, and
    each trial's own cold (evict, reload) over its own warm median.
    """
    by_role: dict[str, list[Mapping[str, Any]]] = {role: [] for role in ROLES}
    for t in trials:
        by_role[t["role"]].append(t)
    out: dict[str, Any] = {
        "ttft_s": {r: summary([t.get("ttft_s") for t in got]) for r, got in by_role.items()},
        "load_s": {
            r: summary([t.get("load_s") for t in got]) for r, got in by_role.items() if r != "warm"
        },
        "rest_s": {
            r: summary(
                [
                    None
                    if t.get("ttft_s") is None or t.get("load_s") is None
                    else t["ttft_s"] - t["load_s"]
                    for t in got
                ]
            )
            for r, got in by_role.items()
            if r != "warm"
        },
        "cached_tokens": {
            r: summary([t.get("cached_tokens") for t in got]) for r, got in by_role.items()
        },
        "proven": {r: [bool(t.get("proven")) for t in got] for r, got in by_role.items()},
    }
    warm = out["ttft_s"]["warm"]["median"]
    out["ratios"] = {f"{r}_over_warm": ratio(out["ttft_s"][r]["median"], warm) for r in ROLES[1:]}
    paired: dict[str, list[float | None]] = {r: [] for r in ROLES[1:]}
    for k in sorted({t["trial"] for t in trials}):
        mine = [t for t in trials if t["trial"] == k]
        own_warm = summary([t.get("ttft_s") for t in mine if t["role"] == "warm"])["median"]
        for t in mine:
            if t["role"] != "warm":
                paired[t["role"]].append(ratio(t.get("ttft_s"), own_warm))
    out["paired_over_warm"] = {r: summary(v) for r, v in paired.items()}
    return out


def decode_summary(rounds: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """
    Per kind of trial over the rounds: the aggregate and per-stream
    tok/s, the streams whole, the paired ratio to the same round's
    one-stream trial; then the ratios of the medians to one stream's.
    """
    out: dict[str, Any] = {}
    for cfg in CONFIGS:
        got = [r[cfg] for r in rounds if cfg in r]
        flags = [w for t in got for w in t.get("whole") or []]
        out[cfg] = {
            "aggregate_tps": summary([t.get("aggregate_tps") for t in got]),
            "per_stream_tps": summary([v for t in got for v in t.get("per_stream_tps") or []]),
            "streams_whole": sum(flags),
            "streams_total": len(flags),
            "loads_during": sum(sum((t.get("loads") or {}).values()) for t in got),
            "errors": [e for t in got for e in t.get("errors") or []],
            "foreign_cores": summary([t.get("foreign_cores") for t in got]),
            "paired_over_one": summary(
                [
                    ratio(r[cfg].get("aggregate_tps"), r["one"].get("aggregate_tps"))
                    for r in rounds
                    if cfg in r and "one" in r
                ]
            ),
        }
    one = out["one"]["aggregate_tps"]["median"]
    out["ratios"] = {
        f"{cfg}_over_one": ratio(out[cfg]["aggregate_tps"]["median"], one) for cfg in CONFIGS[1:]
    }
    out["ratios"]["two_models_per_stream_over_one"] = ratio(
        out["two_models"]["per_stream_tps"]["median"], one
    )
    return out


# -- the servers -----------------------------------------------------------


def models_server(
    settings: Settings, workdir: Path, name: str, model_path: str, budget: int
) -> ServerProcess:
    """C{twistd -n ds4tw --models FILE --models-memory-mb BUDGET --cache-ram-mb 0}."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = (workdir / f"{name}.toml").resolve()
    path.write_text(models_file(model_path), encoding="utf-8")
    return ds4tw_twistd(
        dataclasses.replace(settings, model=None),
        workdir,
        name,
        cache_ram_mb=0,
        extra=("--models", str(path), "--models-memory-mb", str(budget)),
    )


def model_metrics(server: ServerProcess) -> dict[str, Any]:
    status, body = _client.get(server.port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return parse_model_metrics(body.decode("utf-8", errors="replace"))


def read_status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return parse_status(f.read())


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its RSS now (Linux C{clear_refs} 5); whether it could."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class Sampler:
    """
    A server's RSS every L{RSS_INTERVAL_S} and its /health every
    L{HEALTH_INTERVAL_S}, each in its own thread, from L{start} to L{stop}.
    """

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.t0 = time.perf_counter()
        #: (seconds since start, VmRSS, RssAnon, RssFile)
        self.rss: list[tuple[float, int, int, int]] = []
        #: (seconds since start, memory.used_bytes, models in memory, models ready)
        self.health: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._read_rss, name="bench-rss", daemon=True),
            threading.Thread(target=self._read_health, name="bench-health", daemon=True),
        ]

    def start(self) -> Sampler:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _read_rss(self) -> None:
        while True:
            try:
                s = read_status(self.server.pid)
            except OSError:
                return
            self.rss.append(
                (
                    time.perf_counter() - self.t0,
                    s.get("VmRSS", 0),
                    s.get("RssAnon", 0),
                    s.get("RssFile", 0),
                )
            )
            if self._stop.wait(RSS_INTERVAL_S):
                return

    def _read_health(self) -> None:
        while True:
            try:
                h = _client.get_json(self.server.port, "/health", timeout=5)
                used = int((h.get("memory") or {}).get("used_bytes") or 0)
                self.health.append(
                    (time.perf_counter() - self.t0, used, in_memory(h), in_memory(h, ("ready",)))
                )
            except (OSError, RuntimeError, ValueError):
                pass
            if self._stop.wait(HEALTH_INTERVAL_S):
                return


def idle_rss(server: ServerProcess, seconds: float) -> dict[str, Any]:
    """The server's RSS sampled every L{RSS_INTERVAL_S} for C{seconds}."""
    values = []
    deadline = time.perf_counter() + seconds
    while True:
        values.append(read_status(server.pid).get("VmRSS"))
        if time.perf_counter() >= deadline:
            return summary(values)
        time.sleep(RSS_INTERVAL_S)


# -- the measurements ------------------------------------------------------


def ask(server: ServerProcess, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed chat to C{model}: TTFT, tokens, whether it ended whole."""
    s = _client.stream(
        server.port,
        "/v1/chat/completions",
        chat_body(model, prompt, max_tokens),
        timeout=REQUEST_TIMEOUT,
    )
    times = text_times(s.events, None)
    u = usage(s.events) or {}
    text = "".join(got[1] for got in map(delta_text, s.events) if got is not None)
    got: dict[str, Any] = {
        "model": model,
        "status": s.status,
        "error": s.error,
        "ttft_s": times[0] - s.sent if times else None,
        "tokens": u.get("completion_tokens"),
        "prompt_tokens": u.get("prompt_tokens"),
        # A warm model reuses the chat template's header from a slot; a
        # model just loaded prefills it too.
        "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens"),
        "finish_reason": finish_reason(s.events),
        "done": saw_done(s.events),
        "text": text,
        "loading_frames": sum(
            1 for e in s.events if e.kind == "comment" and e.text.startswith("loading")
        ),
        "sent": s.sent,
        "ended": s.reader.reads[-1][0] if s.reader.reads else s.sent,
    }
    got["whole"] = stream_whole(got, max_tokens)
    return got


def load_trial(
    settings: Settings,
    sz: Sizes,
    workdir: Path,
    model_path: str,
    budget: int,
    trial: int,
    prompts: Prompts,
) -> dict[str, Any]:
    """One fresh server: the requests of L{load_plan}, each with its /metrics deltas."""
    plan = load_plan(trial)
    victims = expected_victims(plan)
    server = models_server(settings, workdir, f"ds4tw-models-load-{trial}", model_path, budget)
    requests: list[dict[str, Any]] = []
    foreign = Foreign()
    with running(server, READY_TIMEOUT) as ds:
        for (role, name), victim in zip(plan, victims, strict=True):
            _client.wait_idle(ds.port, timeout=120)
            before = model_metrics(ds)
            noise = foreign.sample()
            got = ask(ds, name, prompts.words(sz.prompt_words), TTFT_TOKENS)
            cores = foreign.since(noise)
            after = model_metrics(ds)
            delta = load_delta(before, after)
            got.update(
                trial=trial,
                role=role,
                expected_victim=victim,
                delta=delta,
                proven=proven(role, name, victim, delta) and got["whole"],
                load_s=None if role == "warm" else (after["load_s"] or {}).get(name),
                memory_bytes=(after["memory_bytes"] or {}).get(name),
                foreign_cores=cores,
            )
            requests.append(got)
        health = _client.get_json(ds.port, "/health")
    return {
        "trial": trial,
        "requests": requests,
        "log": parse_load_lines(server.log_tail(200_000)),
        "memory_bytes": {
            m["name"]: (m.get("memory") or {}).get("total_bytes")
            for m in health.get("models") or []
            if (m.get("memory") or {}).get("measured")
        },
    }


def loads(
    settings: Settings,
    sz: Sizes,
    workdir: Path,
    model_path: str,
    budget: int,
    mark: Callable[[str], None],
) -> dict[str, Any]:
    """Part 1: cold, warm, evicting and reloading TTFT over L{Sizes.load_trials} servers."""
    prompts = Prompts(settings.seed + 21)
    trials = []
    for k in range(sz.load_trials):
        mark(f"models: load trial {k + 1}")
        trials.append(load_trial(settings, sz, workdir, model_path, budget, k, prompts))
    requests = [r for t in trials for r in t["requests"]]
    measured: dict[str, int] = {}
    for t in trials:
        measured.update({k: int(v) for k, v in t["memory_bytes"].items() if v is not None})
    return {
        **role_summary(requests),
        "trials": trials,
        "measured_memory_bytes": measured,
        "foreign_cores": summary([r["foreign_cores"] for r in requests]),
    }


def run_mix(
    server: ServerProcess, plan: Sequence[tuple[str, str]], clients: int, max_tokens: int
) -> list[dict[str, Any]]:
    """C{plan}'s requests C{(model, prompt)} from C{clients} threads, each taking the next."""
    results: list[dict[str, Any] | None] = [None] * len(plan)
    lock = threading.Lock()
    order = iter(range(len(plan)))

    def client(c: int) -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            name, prompt = plan[i]
            try:
                got = ask(server, name, prompt, max_tokens)
            except Exception as e:  # a request that failed counts as not answered
                got = {"model": name, "status": 0, "error": f"{type(e).__name__}: {e}"}
                got["whole"] = False
            results[i] = {**got, "index": i, "client": c}

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT * len(plan))
    return [r or {"status": 0, "error": "not run", "whole": False} for r in results]


def budget_held(
    settings: Settings,
    sz: Sizes,
    workdir: Path,
    model_path: str,
    budget: int,
    mark: Callable[[str], None],
) -> dict[str, Any]:
    """Part 2: the nothing-loaded RSS, then the request mix with RSS and /health sampled."""
    prompts = Prompts(settings.seed + 22)
    names = mix_plan(sz.mix_requests, settings.seed)
    plan = [(name, prompts.words(sz.prompt_words)) for name in names]
    server = models_server(settings, workdir, "ds4tw-models-budget", model_path, budget)
    foreign = Foreign()
    with running(server, READY_TIMEOUT) as ds:
        mark("models: RSS with nothing loaded")
        # The startup's own allocations settle first.
        time.sleep(sz.baseline_s)
        baseline = idle_rss(ds, sz.baseline_s)
        start_status = read_status(ds.pid)
        reset = reset_peak(ds.pid)
        before = model_metrics(ds)
        mark("models: request mix")
        sampler = Sampler(ds).start()
        noise = foreign.sample()
        t0 = time.perf_counter()
        try:
            results = run_mix(ds, plan, CLIENTS, sz.mix_tokens)
        finally:
            sampler.stop()
        mix_s = time.perf_counter() - t0
        cores = foreign.since(noise)
        end_status = read_status(ds.pid)
        after = model_metrics(ds)
        health = _client.get_json(ds.port, "/health")
        _client.wait_idle(ds.port, timeout=60)
        rss_after = idle_rss(ds, sz.baseline_s)
    base = baseline["median"]
    budget_bytes = (health.get("memory") or {}).get("budget_bytes")
    rss_max = max((s[1] for s in sampler.rss), default=None)
    # The kernel's high-water mark since the reset catches what fell
    # between two samples; without the reset it includes the startup.
    peaks = [v for v in (end_status.get("VmHWM") if reset else None, rss_max) if v is not None]
    peak = max(peaks) if peaks else None
    over = None if peak is None or base is None else peak - base
    margin = None if over is None or budget_bytes is None else over - budget_bytes
    used_max = max((s[1] for s in sampler.health), default=None)
    return {
        "budget_bytes": budget_bytes,
        "baseline_rss_bytes": baseline,
        "rss_at_start_bytes": start_status.get("VmRSS"),
        "peak_reset": reset,
        "rss_bytes": summary([s[1] for s in sampler.rss]),
        "rss_anon_max_bytes": max((s[2] for s in sampler.rss), default=None),
        "rss_file_max_bytes": max((s[3] for s in sampler.rss), default=None),
        "peak_rss_bytes": peak,
        "peak_over_baseline_bytes": over,
        "margin_bytes": margin,
        "margin_limit_bytes": int(MARGIN_MB * _MIB),
        "within_margin": None if margin is None else margin <= MARGIN_MB * _MIB,
        "rss_after_bytes": rss_after,
        "used_bytes_max": used_max,
        "used_within_budget": None
        if used_max is None or budget_bytes is None
        else used_max <= budget_bytes,
        # In memory: loading, loaded or unloading (what the server counts);
        # an eviction's victim unloads while the next model loads.
        "in_memory_max": max((s[2] for s in sampler.health), default=None),
        "loaded_max": max((s[3] for s in sampler.health), default=None),
        "samples": {
            "rss": len(sampler.rss),
            "health": len(sampler.health),
            "rss_mib": [[round(t, 3), round(v / _MIB, 1)] for t, v, _, _ in sampler.rss],
            "health_mib": [
                [round(t, 3), round(u / _MIB, 1), n, ready] for t, u, n, ready in sampler.health
            ],
        },
        "requests": len(results),
        "clients": CLIENTS,
        "answered": sum(1 for r in results if r.get("status") == 200 and not r.get("error")),
        "whole": sum(1 for r in results if r.get("whole")),
        "errors": [
            f"{r.get('model')}: {r.get('status')} {r.get('error')}"
            for r in results
            if r.get("status") != 200 or r.get("error")
        ],
        "by_model": {name: names.count(name) for name in NAMES},
        "ttft_s": summary([r.get("ttft_s") for r in results]),
        "mix_s": mix_s,
        "loads": load_delta(before, after),
        "measured_memory_bytes": {
            m["name"]: (m.get("memory") or {}).get("total_bytes")
            for m in health.get("models") or []
            if (m.get("memory") or {}).get("measured")
        },
        "log": parse_load_lines(server.log_tail(200_000)),
        "foreign_cores": cores,
        "request_log": [
            {k: r.get(k) for k in ("index", "client", "model", "status", "ttft_s", "whole")}
            for r in results
        ],
    }


def decode_trial(
    server: ServerProcess, streams: Sequence[tuple[str, str]], max_tokens: int
) -> dict[str, Any]:
    """C{len(streams)} concurrent completions C{(model, prompt)}; their aggregate rate."""
    n = len(streams)
    barrier = threading.Barrier(n)

    def one(item: tuple[str, str]) -> _client.Stream:
        model, prompt = item
        body = {**completion_body("ds4tw", prompt, max_tokens), "model": model}
        barrier.wait()
        return _client.stream(server.port, "/v1/completions", body, timeout=REQUEST_TIMEOUT)

    before = model_metrics(server)
    with ThreadPoolExecutor(n) as ex:
        got = list(ex.map(one, streams))
    after = model_metrics(server)
    per = [trial_numbers(s, max_tokens) for s in got]
    times = [text_times(s.events, None) for s in got]
    spans = [StreamTimes(p["tokens"], t[0], t[-1]) for p, t in zip(per, times, strict=True) if t]
    return {
        "models": [m for m, _ in streams],
        "aggregate_tps": aggregate_rate(spans) if len(spans) == n else None,
        "per_stream_tps": [p["decode_tps"] for p in per],
        "whole": [whole(p, max_tokens) for p in per],
        "errors": [str(p["error"] or p["status"]) for p in per if p["error"] or p["status"] != 200],
        "loads": load_delta(before, after)["loads"],
    }


def decode(
    settings: Settings,
    sz: Sizes,
    workdir: Path,
    model_path: str,
    mark: Callable[[str], None],
) -> dict[str, Any]:
    """Part 3: one stream on one model, two on one model, one on each of two, rotating."""
    prompts = Prompts(settings.seed + 23)
    a, b = NAMES[0], NAMES[1]
    server = models_server(settings, workdir, "ds4tw-models-decode", model_path, 0)
    foreign = Foreign()
    rounds: list[dict[str, dict[str, Any]]] = []
    with running(server, READY_TIMEOUT) as ds:
        mark("models: decode warm-up")
        # Not counted: both loads, and each kind of step run once.
        for name in (a, b):
            ask(ds, name, prompts.words(sz.prompt_words), 8)
        decode_trial(ds, [(a, prompts.words(sz.prompt_words))] * 2, 8)
        decode_trial(ds, [(a, prompts.words(sz.prompt_words)), (b, prompts.words(8))], 8)
        loaded = model_metrics(ds)["loaded"]
        if not (loaded.get(a) and loaded.get(b)):
            raise RuntimeError(f"{a} and {b} are not both loaded after the warm-up: {loaded}")
        mark("models: decode")
        for r in range(sz.decode_rounds):
            got: dict[str, dict[str, Any]] = {}
            for cfg in rotate(CONFIGS, r):
                models = {"one": [a], "batched": [a, a], "two_models": [a, b]}[cfg]
                streams = [(m, prompts.words(sz.prompt_words)) for m in models]
                _client.wait_idle(ds.port, timeout=120)
                noise = foreign.sample()
                got[cfg] = decode_trial(ds, streams, sz.decode_tokens)
                got[cfg]["foreign_cores"] = foreign.since(noise)
                got[cfg]["round"] = r
            rounds.append(got)
    return {
        **decode_summary(rounds),
        "decode_tokens": sz.decode_tokens,
        "rounds": rounds,
        "models": {"one": [a], "batched": [a, a], "two_models": [a, b]},
    }


def estimates(settings: Settings, model_path: str) -> dict[str, int]:
    """
    What each name will take loaded, by the engine's own estimate from
    the GGUF (the fleet's figure before a load): a vocabulary-only load
    in this process, no weights, no compute.
    """
    from ds4tw import LlamaEngine

    return {
        name: LlamaEngine(
            model_path,
            n_ctx=ctx,
            slots=PARALLEL,
            n_batch=settings.batch,
            n_threads=settings.threads,
        )
        .memory()
        .total
        for name, ctx in zip(NAMES, CTX, strict=True)
    }


def measure(
    settings: Settings, workdir: Path, *, mark: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """The whole part; a failure of one measurement is recorded in C{errors}, the others run."""
    if settings.engine != "llama" or not settings.model:
        raise ValueError("the models part needs a GGUF model (a models file serves files only)")
    sz = sizes(settings)
    model_path = str(settings.model)
    estimated = estimates(settings, model_path)
    budget = budget_mb(list(estimated.values()))
    out: dict[str, Any] = {
        "names": list(NAMES),
        "ctx": dict(zip(NAMES, CTX, strict=True)),
        "parallel": PARALLEL,
        "sizes": dataclasses.asdict(sz),
        "source": (
            "client-seen SSE TTFT and token times; ds4tw_model_* deltas on /metrics around "
            "every request; the server log's load lines; /proc/PID/status (VmRSS every "
            f"{RSS_INTERVAL_S * 1e3:.0f} ms, VmHWM since a clear_refs reset); /health "
            f"memory.used_bytes every {HEALTH_INTERVAL_S * 1e3:.0f} ms"
        ),
        "where": (
            f"twistd -n ds4tw --models FILE (one model file as {', '.join(NAMES)}, ctx "
            f"{'/'.join(str(c) for c in CTX)}, parallel {PARALLEL}) --cache-ram-mb 0 --threads "
            f"{settings.threads} --batch {settings.batch}; --models-memory-mb {budget} (any two, "
            "not three) for the loads and the mix, a fresh server per load trial; none for the "
            "decode part"
        ),
        "budget_mb": budget,
        "margin_mb": MARGIN_MB,
        "estimated_memory_bytes": estimated,
        "budget_fits_two": {"estimated": fits_two(budget * _MIB, list(estimated.values()))},
        "notes": [
            "the three names share one model file: after its first load its pages come from "
            "the OS page cache, so no load here reads the device"
        ],
        "errors": [],
        "load": None,
        "budget": None,
        "decode": None,
    }
    parts: tuple[tuple[str, Callable[[], dict[str, Any]]], ...] = (
        ("load", lambda: loads(settings, sz, workdir, model_path, budget, mark)),
        ("budget", lambda: budget_held(settings, sz, workdir, model_path, budget, mark)),
        ("decode", lambda: decode(settings, sz, workdir, model_path, mark)),
    )
    for key, f in parts:
        try:
            out[key] = f()
        except Exception as e:
            out["errors"].append(f"{key}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    measured = {
        **((out["load"] or {}).get("measured_memory_bytes") or {}),
        **((out["budget"] or {}).get("measured_memory_bytes") or {}),
    }
    out["measured_memory_bytes"] = measured
    out["budget_fits_two"]["measured"] = (
        fits_two(budget * _MIB, [measured[n] for n in NAMES])
        if all(measured.get(n) for n in NAMES)
        else None
    )
    if out["errors"] and not (out["load"] or out["budget"] or out["decode"]):
        raise RuntimeError("; ".join(e.splitlines()[0] for e in out["errors"]))
    return out
