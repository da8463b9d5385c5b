"""
A host Klein application with ds4tw mounted under the branch route
C{/llm/} (a scripted engine, no model), on a loopback port: the embedding
a library user writes, for tests/browser/test_page.py.

    python tests/browser/mounted_app.py PORT
"""

from __future__ import annotations

import sys

from klein import Klein
from twisted.internet import reactor
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from ds4tw import Server, ServerConfig
from ds4tw.testing import ScriptedEngine


def main(port: int) -> None:
    engine = ScriptedEngine(["Hello from **under /llm/**."], tps=40)
    llm = Server(engine, ServerConfig(drain_timeout=0))
    llm.startService()
    host = Klein()

    @host.route("/", methods=["GET"])
    def home(request: Request) -> bytes:
        return b"the host application's own page"

    @host.route("/llm/", branch=True)
    def mount(request: Request) -> IResource:
        return llm.resource()

    reactor.listenTCP(port, Site(host.resource()), interface="127.0.0.1")
    reactor.addSystemEventTrigger("before", "shutdown", llm.stopService)
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
