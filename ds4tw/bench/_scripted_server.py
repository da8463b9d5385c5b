"""
A ds4tw server on a paced scripted engine, on a real port: the
benchmark's stand-in for C{twistd -n ds4tw} when there is no model (CI).

The L{ds4tw.testing.ScriptedEngine} here is paced (its C{tps} and
C{prefill_tps}): it sleeps in the model thread for every prefill batch
and every token, so that queueing, keepalives and cancel latency behave
as they would on a model (a fixed, known token time). C{twistd ds4tw
--model scripted:...} serves the same engine. Everything else is the real server:
the same L{ds4tw.Server}, Klein app, worker thread, SSE and log line.

    python -m ds4tw.bench._scripted_server --port 8000 --log server.log

Covered by tests/integration/test_bench_smoke.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ds4tw.testing import Reply, ScriptedEngine


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
    engine = ScriptedEngine(
        [Reply.words("The scripted engine speaks at a steady pace.", eos=False)],
        n_ctx=args.ctx,
        n_batch=args.prefill_batch,
        tps=1000.0 / args.token_ms if args.token_ms > 0 else 0.0,
        prefill_tps=args.prefill_batch * 1000.0 / args.prefill_ms if args.prefill_ms > 0 else 0.0,
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
