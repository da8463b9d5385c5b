"""
C{ds4tw-rpc-worker}: llama.cpp's RPC server (its C{rpc-server} tool)
from the installed llama-cpp-python, so a machine that lends its memory
and compute to a C{twistd ds4tw --rpc ...} needs nothing but ds4tw.

The flags are rpc-server's (tools/rpc/rpc-server.cpp of the vendored
llama.cpp): C{-H/--host}, C{-p/--port}, C{-t/--threads}, C{-d/--device},
C{-c/--cache}, C{-h/--help}; ds4tw adds C{--cache-dir} (the cache in a
directory of one's choosing) and C{--list-devices}. Two differ on
purpose: C{--threads} defaults to every core, as C{twistd ds4tw
--threads} does (rpc-server takes half), and the warning about a
non-loopback host is given for any address outside 127.0.0.0/8
(rpc-server's for anything but 127.0.0.1). rpc-server has no memory cap
in this llama.cpp (older ones had C{-m/--mem}): a worker offers its
devices' real free memory, and the client decides how many layers go
there (C{--tensor-split}), so there is no C{--mem} here either.

Exit status: 0 after SIGINT or SIGTERM; 1 if the port cannot be bound;
2 for bad arguments, an unknown device, or a llama-cpp-python built
without RPC (the message says how to install one with it).

Covered by tests/integration/test_rpc_worker.py.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.python import usage

from .._engine import rpc
from .._version import __version__


def _port(value: str) -> int:
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError(f"--port {value}: expected 1 to 65535")
    return port


def _threads(value: str) -> int:
    threads = int(value)
    if threads < 1:
        raise ValueError(f"--threads {value}: expected at least 1")
    return threads


class Options(usage.Options):
    synopsis = "Usage: ds4tw-rpc-worker [options]"
    longdesc = (
        "Serve this machine's devices to a twistd ds4tw --rpc HOST:PORT over llama.cpp's "
        "RPC protocol (llama.cpp's rpc-server, from the installed llama-cpp-python). "
        "The protocol has no authentication: keep the worker on loopback, a private network "
        "or an SSH/WireGuard tunnel, never on an untrusted network. There is no memory "
        "cap: llama.cpp's rpc-server no longer has one; the worker offers its devices' "
        "free memory and the server's --tensor-split decides what goes where."
    )

    optFlags: list[list[Any]] = [
        [
            "cache",
            "c",
            "Keep tensors the client sends in a local file cache ("
            + str(rpc.default_cache_dir())
            + ", from $LLAMA_CACHE or $XDG_CACHE_HOME as llama.cpp's): a model loaded again "
            "is sent as hashes instead of data.",
        ],
        ["list-devices", None, "List this machine's devices (for --device) and exit."],
    ]
    optParameters: list[list[Any]] = [
        [
            "host",
            "H",
            "127.0.0.1",
            "IPv4 address to listen on (not a hostname; 0.0.0.0: every interface). Any "
            "non-loopback address is a warning: the protocol has no authentication.",
        ],
        ["port", "p", rpc.DEFAULT_PORT, "Port to listen on.", _port],
        [
            "threads",
            "t",
            os.cpu_count() or 1,
            "Threads of the CPU device (default: every core).",
            _threads,
        ],
        [
            "device",
            "d",
            None,
            "Comma-separated devices to serve, by ggml's name (e.g. CPU, CUDA0; see "
            "--list-devices). Default: every GPU, else the CPU.",
        ],
        [
            "cache-dir",
            None,
            None,
            "The cache of --cache in this directory instead (implies --cache).",
        ],
    ]

    opt_h = usage.Options.opt_help

    def opt_version(self) -> None:
        """Display ds4tw's version and exit."""
        print(f"ds4tw-rpc-worker {__version__} (llama.cpp RPC protocol {rpc.version()})")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            rpc.check_listen_host(self["host"])
        except ValueError as e:
            raise usage.UsageError(f"--host: {e}") from None
        names = self["device"]
        devices = [n for n in (names or "").replace("/", ",").split(",") if n.strip()]
        if names is not None and not devices:
            raise usage.UsageError("--device: no device named")
        self["devices"] = tuple(n.strip() for n in devices)
        if self["cache-dir"] is not None:
            self["cache"] = True
            self["cache_path"] = os.path.abspath(os.path.expanduser(self["cache-dir"]))
        elif self["cache"]:
            self["cache_path"] = str(rpc.default_cache_dir())
        else:
            self["cache_path"] = None


class _Stderr(logging.StreamHandler):
    """Writes to whatever C{sys.stderr} is when a record comes."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _log_to_stderr() -> None:
    """ds4tw.rpc's lines on stderr, leaving the root logger to whoever embeds this."""
    logger = logging.getLogger("ds4tw.rpc")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(
            logging.Formatter("%(asctime)s ds4tw-rpc-worker %(levelname)s: %(message)s")
        )
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: returns only on an error (the worker ends the process)."""
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        print(f"ds4tw-rpc-worker: {e} (see --help)", file=sys.stderr)
        return 2
    _log_to_stderr()
    try:
        if options["list-devices"]:
            for device in rpc.local_devices():
                print(f"{device} [{device.kind}]")
            return 0
        rpc.serve(
            rpc.Endpoint(options["host"], options["port"]),
            threads=options["threads"],
            cache_dir=options["cache_path"],
            devices=options["devices"],
        )
    except rpc.RPCUnavailable as e:
        print(f"ds4tw-rpc-worker: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"ds4tw-rpc-worker: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
