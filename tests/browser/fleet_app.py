"""
A ds4tw server with two scripted chat models, each loaded on its first
request, on a loopback port: what the page's model picker is tested
against in tests/browser/test_models.py.

C{big} (aliases C{claude-*} and the exact C{gpt-big}) and C{small} each
answer with their own name. Their loads take a moment (C{LOAD_S}
seconds, in C{LOAD_STEPS} reported steps), as a real model's do, so the
page shows C{loading the model N%} while a request waits for one.

    python tests/browser/fleet_app.py PORT
"""

from __future__ import annotations

import sys
import time

from twisted.internet import reactor
from twisted.web.server import Site

from ds4tw import Server, ServerConfig
from ds4tw._engine.interface import LoadProgress
from ds4tw._runtime.fleet import Model
from ds4tw.testing import ScriptedEngine

#: How long a load takes, and in how many reported steps.
LOAD_S = 2.5
LOAD_STEPS = 10


class SlowLoad(ScriptedEngine):
    """A scripted engine whose load takes LOAD_S, in the loading thread, like a real one."""

    def load(self, progress: LoadProgress | None = None) -> None:
        def paced(fraction: float) -> bool:
            time.sleep(LOAD_S / LOAD_STEPS)  # the loading thread's own time: a file being read
            return progress is None or progress(fraction)

        super().load(paced)


def engine(name: str) -> ScriptedEngine:
    return SlowLoad([f"Reply from **{name}**."], model_id=name, tps=40, load_steps=LOAD_STEPS)


def main(port: int) -> None:
    server = Server(
        models=[
            Model(engine("big"), aliases=("claude-*", "gpt-big")),
            Model(engine("small")),
        ],
        config=ServerConfig(drain_timeout=0),
    )
    server.startService()
    reactor.listenTCP(port, Site(server.resource()), interface="127.0.0.1")
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
