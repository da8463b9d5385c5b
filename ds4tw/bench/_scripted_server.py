"""
A ds4tw server on a paced scripted engine, on a real port: the
benchmark's stand-in for C{twistd -n ds4tw} when there is no model (CI).

L{ds4tw.testing.ScriptedEngine} computes instantly; L{PacedEngine}
sleeps in the model thread for every prefill batch and every token, so
that queueing, keepalives and cancel latency behave as they would on a
model (a fixed, known token time). Everything else is the real server:
the same L{ds4tw.Server}, Klein app, worker thread, SSE and log line.

    python -m ds4tw.bench._scripted_server --port 8000 --log server.log

Covered by tests/integration/test_bench_smoke.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Generator, Sequence
from typing import Any

from ds4tw._engine import (
    Aborted,
    AbortFlag,
    EngineEvent,
    FinishReason,
    PrefillProgress,
    SamplingParams,
)
from ds4tw.testing import Reply, ScriptedEngine


class PacedEngine(ScriptedEngine):
    """
    A L{ScriptedEngine} that takes C{token_s} per token and C{prefill_s}
    per prefill batch, like a (very small, very regular) model.
    """

    def __init__(self, *, token_s: float, prefill_s: float, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.token_s = token_s
        self.prefill_s = prefill_s

    #: The paced "compute" checks the abort flag this often, as llama.cpp
    #: checks it between graph nodes.
    ABORT_SLICE_S = 0.001

    def _compute(self, seconds: float, abort: AbortFlag | None) -> None:
        end = time.perf_counter() + seconds
        while (left := end - time.perf_counter()) > 0:
            if abort is not None and abort.is_set:
                raise Aborted
            time.sleep(min(left, self.ABORT_SLICE_S))

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, abort: AbortFlag | None = None
    ) -> Generator[EngineEvent, None, FinishReason]:
        inner = super().generate(prompt, params, abort)
        try:
            while True:
                try:
                    event = next(inner)
                except StopIteration as done:
                    return done.value
                # The "compute" of this event, before handing it over.
                self._compute(
                    self.prefill_s if isinstance(event, PrefillProgress) else self.token_s, abort
                )
                yield event
        finally:
            inner.close()


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds4tw.bench._scripted_server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True, help="log file (twistd's format)")
    p.add_argument("--keepalive", type=float, default=15.0)
    p.add_argument("--max-queue", type=int, default=128)
    p.add_argument("--token-ms", type=float, default=4.0)
    p.add_argument("--prefill-ms", type=float, default=25.0)
    p.add_argument("--prefill-batch", type=int, default=64)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument(
        "--think",
        action="store_true",
        help="open a <think> block in the generation prompt (a silent decode)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.server import Site

    from ds4tw import Server, ServerConfig

    args = parse(sys.argv[1:] if argv is None else argv)
    log_file = open(args.log, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    # A reply that never ends by itself: every request uses ignore_eos or
    # max_tokens, as the benchmark's do.
    engine = PacedEngine(
        replies=[Reply.words("The scripted engine speaks at a steady pace.", eos=False)],
        n_ctx=args.ctx,
        prefill_batch=args.prefill_batch,
        token_s=args.token_ms / 1000.0,
        prefill_s=args.prefill_ms / 1000.0,
    )
    if args.think:
        engine.generation_prompt_suffix = "<think>\n"
    server = Server(engine, ServerConfig(keepalive=args.keepalive, max_queue=args.max_queue))
    server.startService()
    r: Any = reactor
    r.addSystemEventTrigger("before", "shutdown", server.stopService)
    r.listenTCP(args.port, Site(server.resource()), interface="127.0.0.1")
    r.run()


if __name__ == "__main__":
    main()
