"""
C{twistd ds4tw}'s service, run by this launcher instead of twistd, with
one engine option twistd does not offer: the in-step abort off
(L{ds4tw.EngineOptions.abort_in_step}), so that the cancel part can time
a server that cancels between steps only, as ds4tw did before the in-step abort.
The options are twistd's (L{ds4tw.Options}) and so is the service
(L{ds4tw.makeService}); only the process around it differs.

    python -m ds4tw.bench._serve --log server.log --no-abort-in-step -- --model M.gguf ...

Covered by tests/unit/test_bench.py (the options; the full run on the
demo model starts it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from ds4tw import EngineOptions, Options, makeService


class EngineSwitches(Options):
    """C{twistd ds4tw}'s options, with the in-step abort as the launcher sets it."""

    abort_in_step = True

    def engine_options(self) -> EngineOptions:
        return dataclasses.replace(super().engine_options(), abort_in_step=self.abort_in_step)


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, EngineSwitches]:
    p = argparse.ArgumentParser(prog="python -m ds4tw.bench._serve")
    p.add_argument("--log", required=True, help="log file (twistd's format)")
    p.add_argument("--no-abort-in-step", action="store_true")
    p.add_argument("options", nargs=argparse.REMAINDER, help="-- then twistd ds4tw's options")
    args = p.parse_args(argv)
    options = EngineSwitches()
    options.abort_in_step = not args.no_abort_in_step
    rest = args.options[1:] if args.options[:1] == ["--"] else args.options
    options.parseOptions(rest)
    return args, options


def main(argv: Sequence[str] | None = None) -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    args, options = parse(sys.argv[1:] if argv is None else argv)
    log_file = open(args.log, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    service = makeService(options)
    service.startService()
    r: Any = reactor
    r.addSystemEventTrigger("before", "shutdown", service.stopService)
    r.run()


if __name__ == "__main__":
    main()
