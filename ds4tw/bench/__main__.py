"""
C{ds4tw-bench [--quick] [--out DIR] [--clients N] [--engine llama|scripted]
[--only cancel|batching|cache|models|dialects|grammar|parsers|rpc]}

One run, in this order:

  1. throughput: raw llama-cpp-python in this process, ds4tw under
     twistd and the peer (llama_cpp.server), all loaded at once and
     measured interleaved prompt by prompt (L{ds4tw.bench._throughput});
  2. cancel latency on the same ds4tw server, the peer stopped;
  3. continuous batching: 1, 2, 4 and 8 concurrent streams on
     C{twistd ds4tw --parallel 8} against llama.cpp's batch API in this
     process, a short request's TTFT beside a long decode, a stream's
     worst token gap while another request prefills ~3,000 tokens, and
     the reactor's CPU per token (L{ds4tw.bench._batching});
  4. prompt cache: TTFT of a cold turn with a ~2,000-token prefix and of
     the next turns from a retained slot, from memory and from disk after
     a restart, and four conversations round-robin on two slots with the
     cache on and off (L{ds4tw.bench._cache});
  5. several models in one server: TTFT of a cold, a warm, an evicting
     and a reloading model, the server's RSS under a mix over three model
     names with a budget that fits two, and two models decoding at once
     against one (L{ds4tw.bench._models});
  6. constrained decode: unconstrained, JSON-schema and forced-tool-call
     grammars on a LlamaEngine in this process
     (L{ds4tw.bench._constrained});
  7. keepalive timing and many waiting clients on a second ds4tw server
     with a small C{--keepalive} and a template that makes a silent decode;
  8. every tool-call syntax's splitting cost per character (also as a
     share of the throughput part's decoded token) and grammar build time
     (L{ds4tw.bench._parsers}; no model).

With C{--engine scripted} there is no model: ds4tw runs on a paced
scripted engine (L{ds4tw.bench._scripted_server}; the batching part on
C{twistd ds4tw --model scripted:...}), raw, peer, the raw batched baseline,
the models part (a models file serves GGUF files only) and the
constrained decode are skipped (notes in the JSON say so), and
everything else runs the same.

C{--only cancel} runs the cancel numbers alone; C{--only batching}
runs the continuous-batching part alone and then the prefill
fairness part (a long prompt's TTFT under a flood of short ones, with and
without the prefill order's aging, on an in-process engine:
L{ds4tw.bench._fairness}), C{--only cache} the prompt cache part alone,
each of the last two on either engine, C{--only models} the models part
alone (the real model only), and C{--only grammar} the grammar
build time of real agents' tool lists (L{ds4tw.bench._grammars}; no
model); C{--only parsers} every tool-call
syntax's splitting and grammar build cost against Hermes' (no model);
C{--only dialects} the same greedy streamed turn through the four
dialects (chat completions, Responses, Anthropic Messages, Ollama) on one
server, interleaved, each against chat completions
(L{ds4tw.bench._dialects}; either engine; only with C{--only}); C{--only rpc}
the model split over llama.cpp RPC workers on loopback against it in this
process, interleaved, with the bytes and round trips per token on the wire
(L{ds4tw.bench._rpc}; the real model and an RPC build; only with C{--only}).

A part that fails is recorded in the JSON's C{errors} and the run goes
on; the exit status is 1 if any part failed, 0 otherwise. Targets are
reported, never enforced by the exit status: speed depends on the
machine.

Covered by tests/integration/test_bench_smoke.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import (
    _batching,
    _cache,
    _cancel,
    _constrained,
    _dialects,
    _fairness,
    _keepalive,
    _many,
    _models,
    _noise,
    _report,
    _servers,
    _settings,
    _throughput,
)
from ._settings import Settings, make_settings
from ._workload import THINK_TEMPLATE, plan


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ds4tw-bench",
        description="Measure ds4tw against raw llama-cpp-python and llama_cpp.server.",
    )
    p.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    p.add_argument("--out", default="bench-results", help="directory for bench.json/bench.png")
    p.add_argument("--clients", type=int, default=None, help="waiting clients (default 200)")
    p.add_argument(
        "--engine",
        choices=("llama", "scripted"),
        default="llama",
        help="llama: the real model; scripted: no model (CI smoke), raw and peer skipped",
    )
    p.add_argument("--model", default=None, help="a .gguf file (default: the demo model)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--keepalive", type=float, default=None, help="K for the keepalive parts")
    p.add_argument("--no-peer", action="store_true", help="skip llama_cpp.server")
    p.add_argument(
        "--baseline",
        default=None,
        metavar="DIR",
        help="a ds4tw source tree (e.g. git worktree add DIR REV) served beside this one in the "
        "throughput part, interleaved: an A/B of two versions in one run",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait (at most this long) until other processes use < 0.25 cores for 5 s",
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--only",
        choices=(
            "throughput",
            "cancel",
            "batching",
            "cache",
            "models",
            "dialects",
            "grammar",
            "parsers",
            "rpc",
        ),
        default=None,
        help="throughput: only raw, ds4tw, the peer and any --baseline, interleaved; "
        "cancel: only the cancel latency (in-step abort, then between steps only, "
        "as before the in-step abort) and the abort check's cost; batching: only the continuous "
        "batching part (streams at once vs raw batched decode, TTFT beside a "
        "long decode, token gaps during a long prefill, reactor CPU per token; then a long "
        "prompt's TTFT under a flood of short ones, prefill aging on and off); cache: only "
        "the prompt cache part (TTFT from a slot, memory and disk over cold, "
        "interleaved conversations' hit rate and prefill time with the cache on and off); "
        "models: only the models part (one twistd with three model names: TTFT of a cold, "
        "warm, evicting and reloading model, RSS against the memory budget under a request "
        "mix, two models decoding at once against one; the real model only); "
        "dialects: only the four dialects compared (the same greedy streamed turn through "
        "chat completions, Responses, Anthropic Messages and Ollama on one server, interleaved: "
        "TTFT, decode tok/s, bytes per token and reactor CPU against chat completions); "
        "grammar: only the grammar build time of real agents' tool lists (from "
        "tests/agents/fixtures in a checkout), cold and cached, against the request's own "
        "validation and templating; parsers: only every tool-call syntax's splitting cost "
        "per character and grammar build time for Claude Code's tools, against Hermes'; "
        "rpc: only the model split over llama.cpp RPC workers on loopback (local, in a child "
        "process, all layers on two workers, half of them) interleaved: TTFT, decode tok/s, "
        "bytes per token on the wire and round trips (--threads: each engine's and each "
        "worker's, default 1; the real model only)",
    )
    args = p.parse_args(argv)
    if args.clients is not None and args.clients < 1:
        p.error("--clients must be at least 1")
    if args.only == "models" and args.engine != "llama":
        p.error("--only models needs --engine llama: a models file serves GGUF files only")
    if args.only == "rpc" and args.engine != "llama":
        p.error("--only rpc needs --engine llama: llama.cpp's RPC workers run a GGUF model")
    return args


class Run:
    """The document being filled, and the record of parts that failed."""

    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self.settings = settings
        self.started = time.perf_counter()
        self.noise = _noise.Monitor()
        self.noise.start()
        self.doc: dict[str, Any] = {
            "schema": _report.SCHEMA,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["ds4tw-bench", *argv]),
            "engine": settings.engine,
            "duration_s": 0.0,
            "machine": _report.machine(),
            "versions": _report.versions(),
            "model": {},
            "settings": settings.as_dict(),
            "notes": [],
            "errors": [],
            "raw": None,
            "ds4tw": None,
            "peer": None,
            "ratios": {},
            "cancel": None,
            "keepalive": None,
            "many_clients": None,
            "constrained": None,
            "cancel_between_steps": None,
            "abort_check": None,
            "batching": None,
            "prefill_fairness": None,
            "cache": None,
            "models": None,
            "dialects": None,
            "targets": [],
        }

    def part(self, name: str, f: Callable[[], Any]) -> Any:
        """Run one part; a failure is recorded (with its traceback) and the run goes on."""
        t0 = time.perf_counter()
        self.noise.mark(name)
        print(f"ds4tw-bench: {name} ...", flush=True)
        try:
            result = f()
        except Exception as e:
            self.doc["errors"].append(f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            print(f"ds4tw-bench: {name} FAILED: {e}", flush=True)
            return None
        print(f"ds4tw-bench: {name} done in {time.perf_counter() - t0:.1f}s", flush=True)
        return result

    def finish(self, out: Path) -> int:
        doc = self.doc
        doc["ratios"] = _report.ratios(doc)
        doc["targets"] = _report.targets(doc)
        doc["machine"]["loadavg_end"] = list(os.getloadavg())
        doc["machine"].update(self.noise.stop())
        doc["duration_s"] = time.perf_counter() - self.started
        problems = _report.validate(doc)
        if problems:
            doc["errors"].append("schema: " + "; ".join(problems))
        _report.write_json(doc, out / "bench.json")
        try:
            _report.chart(doc, out / "bench.png")
        except Exception as e:
            doc["errors"].append(f"chart: {type(e).__name__}: {e}")
            _report.write_json(doc, out / "bench.json")
        print()
        print(_report.table(doc))
        print(f"\nresults: {out / 'bench.json'}, {out / 'bench.png'}")
        return 1 if doc["errors"] else 0


def _model_info(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    return {"path": str(p), "name": p.name, "size_bytes": p.stat().st_size}


def _peer_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp.server") is not None and (
        importlib.util.find_spec("uvicorn") is not None
    )


def run_llama(run: Run, args: argparse.Namespace, out: Path) -> None:
    from . import _raw

    doc = run.doc
    model_path = _settings.model_path(run.settings.model)
    s = dataclasses.replace(run.settings, model=model_path)
    doc["model"] = _model_info(model_path)
    work = out / "logs"
    workload = plan(s)
    use_peer = not args.no_peer and _peer_available()
    if not use_peer:
        doc["notes"].append(
            "peer skipped: "
            + ("--no-peer" if args.no_peer else "llama_cpp.server is not installed (bench extra)")
        )

    with ExitStack() as stack:
        # Raw stays loaded through the cancel part: it is the paired
        # reference for the prefill batch time.
        raw = run.part("load raw llama-cpp-python", lambda: _raw.RawLlama(s))
        if raw is not None:
            stack.callback(raw.close)
            doc["model"]["use_extra_bufts"] = raw.use_extra_bufts

        def throughput() -> dict[str, dict[str, Any]]:
            assert raw is not None
            with ExitStack() as servers:
                ds = servers.enter_context(
                    _servers.running(_servers.ds4tw_twistd(s, work, "ds4tw"))
                )
                runners: dict[str, _throughput.Runner] = {
                    "raw": raw.trial,
                    "ds4tw": _throughput.http_runner(ds, "ds4tw"),
                }
                pids = {"raw": os.getpid(), "ds4tw": ds.pid}
                if use_peer:
                    peer = servers.enter_context(
                        _servers.running(_servers.peer(s, work, model_path))
                    )
                    runners["peer"] = _throughput.http_runner(peer, "peer", eog_ids=raw.eog_ids)
                    runners["peer_natural"] = _throughput.http_runner(peer, "peer", fixed=False)
                    pids["peer"] = peer.pid
                if args.baseline:
                    base = servers.enter_context(
                        _servers.running(
                            _servers.ds4tw_twistd(
                                s, work, "ds4tw-baseline", source=Path(args.baseline).absolute()
                            )
                        )
                    )
                    runners["baseline"] = _throughput.http_runner(base, "ds4tw")
                    pids["baseline"] = base.pid
                got = _throughput.measure(
                    runners, s, workload, decode_only=["peer_natural"], pids=pids, reference="raw"
                )
                got["ds4tw"]["server_rss_bytes"] = ds.rss()
                return got

        got = run.part("throughput (raw, ds4tw, peer interleaved)", throughput) if raw else None
        if got is not None and raw is not None:
            doc["raw"] = {
                **got["raw"],
                "load_s": raw.load_s,
                "eog_ids": raw.eog_ids,
                "use_extra_bufts": raw.use_extra_bufts,
            }
            doc["ds4tw"] = got["ds4tw"]
            if "peer" in got:
                doc["peer"] = {"fixed": got["peer"], "natural": got["peer_natural"]}
            if "baseline" in got:
                doc["baseline"] = {**got["baseline"], "source": str(args.baseline)}
        if args.only == "throughput":
            doc["notes"].append("--only throughput: the other parts did not run")
            return

        def batch_reference(text: str) -> list[float]:
            assert raw is not None
            batches = raw.run(text, 1)["batches"]
            return [t for n, t in batches if n == s.batch]

        def cancel() -> dict[str, Any]:
            server = _servers.ds4tw_twistd(
                s, work, "ds4tw-cancel", keepalive=_cancel.CANCEL_KEEPALIVE
            )
            with _servers.running(server) as ds:
                return _cancel.measure(
                    ds, s, batch_reference=batch_reference if raw is not None else None
                )

        doc["cancel"] = run.part("cancel latency", cancel)

    # After the throughput servers and raw are gone: this part loads its own
    # (a --parallel 8 server and an 8-sequence raw context).
    _batching_part(run, s, work)
    _cache_part(run, s, work)
    _models_part(run, s, work)

    def load_engine() -> Any:
        from ds4tw import LlamaEngine

        engine = LlamaEngine(model_path, n_ctx=s.ctx, n_threads=s.threads, n_batch=s.batch)
        engine.load()
        return engine

    doc["constrained"] = run.part(
        "constrained decode (in-process engine)", lambda: _constrained.measure(s, load_engine)
    )
    _keepalive_and_many(
        run,
        lambda: _servers.ds4tw_twistd(
            s,
            work,
            "ds4tw-keepalive",
            keepalive=s.keepalive,
            max_queue=s.clients + 16,
            chat_template=THINK_TEMPLATE,
            # Everyone waits behind one long job: one slot.
            parallel=1,
        ),
    )
    decode = ((run.doc["raw"] or {}).get("decode_tps") or {}).get("median")
    _parsers_part(run, 1.0 / decode if decode else None, fixtures_required=False)


def _parsers_part(run: Run, token_s: float | None, fixtures_required: bool) -> None:
    """
    Every tool-call syntax's splitting and grammar cost (L{ds4tw.bench._parsers}).
    In a full run, away from a checkout's captured requests, the grammar
    half is skipped with a note rather than failing the run.
    """
    from . import _grammars, _parsers

    quick = run.settings.quick
    got: dict[str, Any] = {
        "splitters": run.part(
            "tool-call splitting per character (every syntax)",
            lambda: _parsers.measure_splitters(quick=quick, token_s=token_s),
        ),
        "grammars": None,
    }
    if fixtures_required or _grammars.FIXTURES.is_dir():
        got["grammars"] = run.part(
            "tool-call grammar build (every syntax, Claude Code's tools)",
            lambda: _parsers.measure_grammars(quick=quick),
        )
    else:
        run.doc["notes"].append(
            f"parsers: grammar build skipped, no {_grammars.FIXTURES} here (run from a checkout)"
        )
    run.doc["parsers"] = got


def _batching_part(run: Run, s: Settings, work: Path) -> None:
    """Continuous batching; the throughput part's ds4tw/raw decode ratio goes beside its own."""
    throughput_ratio = _report.ratios(run.doc).get("ds4tw_decode") if run.doc["raw"] else None
    run.doc["batching"] = run.part(
        "continuous batching",
        lambda: _batching.measure(s, work, mark=run.noise.mark, throughput_ratio=throughput_ratio),
    )
    if s.engine == "scripted":
        run.doc["notes"].append(
            "batching: no raw batched baseline on the scripted engine (no model); ds4tw ran "
            "on twistd --model scripted:..., whose step time does not grow with the batch"
        )


def _cache_part(run: Run, s: Settings, work: Path) -> None:
    """The prompt cache part; a half of it that failed is one of the run's errors."""
    got = run.part("prompt cache", lambda: _cache.measure(s, work, mark=run.noise.mark))
    run.doc["cache"] = got
    if got is not None:
        run.doc["errors"] += [f"prompt cache: {e}" for e in got["errors"]]


def _models_part(run: Run, s: Settings, work: Path) -> None:
    """The models part (the real model only); a measurement of it that failed is a run error."""
    got = run.part("several models", lambda: _models.measure(s, work, mark=run.noise.mark))
    run.doc["models"] = got
    if got is not None:
        run.doc["errors"] += [f"models: {e}" for e in got["errors"]]


def _keepalive_and_many(run: Run, start: Callable[[], _servers.ServerProcess]) -> None:
    s = run.settings

    def both() -> None:
        with _servers.running(start()) as server:
            run.doc["keepalive"] = run.part(
                "keepalive timing", lambda: _keepalive.measure(server, s)
            )
            run.doc["many_clients"] = run.part(
                f"{s.clients} waiting clients", lambda: _many.measure(server, s, s.clients)
            )

    run.part("keepalive server", both)


def run_scripted(run: Run, out: Path) -> None:
    s = run.settings
    doc = run.doc
    work = out / "logs"
    doc["model"] = {
        "name": "scripted",
        "token_ms": s.scripted_token_ms,
        "prefill_ms_per_batch": s.scripted_prefill_ms,
        "prefill_batch": s.scripted_prefill_batch,
    }
    doc["notes"].append(
        "scripted engine: raw llama-cpp-python and the peer server were skipped (no model); "
        "ds4tw ran on a paced ScriptedEngine, so its numbers show the server layer only"
    )
    doc["notes"].append("constrained decode skipped: it measures the real sampler (no model)")
    doc["notes"].append("models part skipped: a models file serves GGUF files only (no model)")
    workload = plan(s)

    def throughput() -> dict[str, Any]:
        with _servers.running(_servers.ds4tw_scripted(s, work, "ds4tw")) as ds:
            got = _throughput.measure(
                {"ds4tw": _throughput.http_runner(ds, "ds4tw")}, s, workload, pids={"ds4tw": ds.pid}
            )
            return got["ds4tw"]

    doc["ds4tw"] = run.part("throughput (ds4tw on the scripted engine)", throughput)

    def cancel() -> dict[str, Any]:
        server = _servers.ds4tw_scripted(
            s, work, "ds4tw-cancel", keepalive=_cancel.CANCEL_KEEPALIVE
        )
        with _servers.running(server) as ds:
            return _cancel.measure(
                ds, s, batch_reference=None, fixed_batch_s=s.scripted_prefill_ms / 1000.0
            )

    doc["cancel"] = run.part("cancel latency", cancel)
    _batching_part(run, s, work)
    _cache_part(run, s, work)
    _keepalive_and_many(
        run,
        lambda: _servers.ds4tw_scripted(
            s,
            work,
            "ds4tw-keepalive",
            keepalive=s.keepalive,
            max_queue=s.clients + 16,
            think=True,
        ),
    )


def run_cancel_only(run: Run, out: Path) -> None:
    """
    The in-step abort's numbers, same run: cancel latency with the abort flag
    checked inside a step, then with the check between steps only
    (L{ds4tw.EngineOptions.abort_in_step} off, ds4tw before the in-step abort;
    L{ds4tw.bench._serve}), then decode throughput with and without the
    abort callback.
    """
    from . import _abort, _raw

    model_path = _settings.model_path(run.settings.model)
    s = dataclasses.replace(run.settings, model=model_path)
    run.doc["model"] = _model_info(model_path)
    run.doc["notes"].append(
        "--only cancel: no throughput part (raw, ds4tw, peer sections empty); raw "
        "llama-cpp-python is loaded only to time prefill batches for the cancel reference"
    )
    work = out / "logs"
    raw = run.part("load raw llama-cpp-python", lambda: _raw.RawLlama(s))

    def batch_reference(text: str) -> list[float]:
        assert raw is not None
        batches = raw.run(text, 1)["batches"]
        return [t for n, t in batches if n == s.batch]

    def cancel(name: str, in_step: bool) -> dict[str, Any]:
        server = _servers.ds4tw_twistd(
            s, work, name, keepalive=_cancel.CANCEL_KEEPALIVE, abort_in_step=in_step
        )
        with _servers.running(server) as ds:
            return _cancel.measure(
                ds, s, batch_reference=batch_reference if raw is not None else None
            )

    run.doc["cancel"] = run.part(
        "cancel latency (abort inside a step)", lambda: cancel("ds4tw-cancel", True)
    )
    run.doc["cancel_between_steps"] = run.part(
        "cancel latency (between steps only, as before)",
        lambda: cancel("ds4tw-cancel-old", False),
    )
    if raw is not None:
        raw.close()

    def load_engine() -> Any:
        from ds4tw import LlamaEngine

        engine = LlamaEngine(model_path, n_ctx=s.ctx, n_threads=s.threads, n_batch=s.batch)
        engine.load()
        return engine

    run.doc["abort_check"] = run.part(
        "abort check cost (decode with / without the callback)",
        lambda: _abort.measure(s, load_engine),
    )


def _one_part_settings(run: Run) -> Settings:
    """The settings of an C{--only} part on either engine, its model resolved and recorded."""
    s = run.settings
    if s.engine == "scripted":
        run.doc["model"] = {"name": "scripted", "token_ms": s.scripted_token_ms}
        run.doc["notes"].append("scripted engine: raw llama-cpp-python and the peer were skipped")
        return s
    model_path = _settings.model_path(s.model)
    run.doc["model"] = _model_info(model_path)
    return dataclasses.replace(s, model=model_path)


def run_batching_only(run: Run, out: Path) -> None:
    """
    Continuous batching's numbers alone (L{ds4tw.bench._batching}), then the prefill
    fairness part (L{ds4tw.bench._fairness}), on either engine.
    """
    s = _one_part_settings(run)
    run.doc["notes"].append(
        "--only batching: no throughput part (raw, ds4tw, peer sections empty); the batching "
        "part measures its own single-stream ratio against its raw batched baseline"
    )
    _batching_part(run, s, out / "logs")

    def load_engine() -> Any:
        if s.engine == "scripted":
            return _fairness.scripted_engine(s)
        from ds4tw import LlamaEngine

        engine = LlamaEngine(
            str(s.model),
            n_ctx=s.ctx,
            n_threads=s.threads,
            n_batch=s.batch,
            slots=_fairness.SLOTS,
        )
        engine.load()
        return engine

    # After the batching part's servers are gone: this one loads its own engine.
    run.doc["prefill_fairness"] = run.part(
        "prefill fairness (in-process engine)",
        lambda: _fairness.measure(s, load_engine, mark=run.noise.mark),
    )
    if s.engine == "scripted":
        run.doc["notes"].append(
            "prefill fairness: on a paced ScriptedEngine (no model); its steps are the "
            "policy's, its times only the pace's"
        )


def run_cache_only(run: Run, out: Path) -> None:
    """The prompt cache's numbers alone (L{ds4tw.bench._cache}), on either engine."""
    s = _one_part_settings(run)
    run.doc["notes"].append(
        "--only cache: no throughput part (raw, ds4tw, peer sections empty); every cache "
        "figure is a ratio against a baseline of its own part"
    )
    _cache_part(run, s, out / "logs")


def run_models_only(run: Run, out: Path) -> None:
    """Several models in one server alone (L{ds4tw.bench._models}); the real model only."""
    s = _one_part_settings(run)
    run.doc["notes"].append(
        "--only models: no throughput part (raw, ds4tw, peer sections empty); every models "
        "figure is a ratio against a baseline of its own part (a warm model's TTFT, the "
        "server's RSS with nothing loaded, one stream on one model)"
    )
    _models_part(run, s, out / "logs")


def run_dialects_only(run: Run, out: Path) -> None:
    """The four dialects compared on one server (L{ds4tw.bench._dialects}), on either engine."""
    s = _one_part_settings(run)
    run.doc["notes"].append(
        "--only dialects: no throughput part (raw, ds4tw, peer sections empty); every dialects "
        "figure is also a ratio against /v1/chat/completions in the same rounds"
    )
    run.doc["dialects"] = run.part(
        "the four dialects",
        lambda: _dialects.measure(s, out / "logs", mark=run.noise.mark),
    )


def run_grammar_only(run: Run) -> None:
    """Real agents' tool lists' grammar build times alone (L{ds4tw.bench._grammars}); no model."""
    from . import _grammars

    run.doc["notes"].append(
        "--only grammar: no throughput part (raw, ds4tw, peer sections empty); every grammar "
        "figure is also a ratio against the same request's validation and templating"
    )
    run.doc["grammars"] = run.part(
        "grammar build time (agents' tool lists)",
        lambda: _grammars.measure(quick=run.settings.quick),
    )


def run_rpc_only(run: Run, out: Path, threads: int | None) -> None:
    """The model split over RPC workers against it in one process (L{ds4tw.bench._rpc})."""
    from . import _rpc

    s = _one_part_settings(run)
    run.doc["notes"].append(
        "--only rpc: no throughput part (raw, ds4tw, peer sections empty); every rpc figure "
        "is also a ratio against the model in this process in the same rounds"
    )
    run.doc["rpc"] = run.part(
        "a model over RPC workers",
        lambda: _rpc.measure(
            s, out / "logs", threads=threads or _rpc.DEFAULT_THREADS, mark=run.noise.mark
        ),
    )
    print("\n".join(_rpc.table(run.doc["rpc"])))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    settings = make_settings(
        quick=args.quick,
        engine=args.engine,
        model=args.model,
        clients=args.clients,
        ctx=args.ctx,
        threads=args.threads,
        batch=args.batch,
        keepalive=args.keepalive,
        seed=args.seed,
    )
    # Absolute: the servers run in out/logs and are given paths in it.
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if args.wait_quiet > 0:
        print(f"ds4tw-bench: waiting up to {args.wait_quiet:.0f}s for a quiet machine", flush=True)
        quiet = _noise.wait_quiet(args.wait_quiet)
        print(f"ds4tw-bench: {quiet}", flush=True)
    else:
        quiet = {"waited_s": 0.0, "quiet": None}
    run = Run(settings, argv)
    run.doc["machine"]["wait_quiet"] = quiet
    if args.only == "cancel":
        run_cancel_only(run, out)
    elif args.only == "batching":
        run_batching_only(run, out)
    elif args.only == "cache":
        run_cache_only(run, out)
    elif args.only == "models":
        run_models_only(run, out)
    elif args.only == "dialects":
        run_dialects_only(run, out)
    elif args.only == "grammar":
        run_grammar_only(run)
    elif args.only == "rpc":
        run_rpc_only(run, out, args.threads)
    elif args.only == "parsers":
        run.doc["notes"].append(
            "--only parsers: no throughput part (raw, ds4tw, peer sections empty), so no "
            "decoded token to set the splitting cost against; every figure is also a ratio "
            "against the Hermes parser in the same run"
        )
        _parsers_part(run, None, fixtures_required=True)
    elif settings.engine == "scripted":
        run_scripted(run, out)
    else:
        run_llama(run, args, out)
    return run.finish(out)


if __name__ == "__main__":
    sys.exit(main())
