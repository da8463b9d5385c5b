"""
llama.cpp's RPC backend, from the installed llama-cpp-python: the worker
side (L{serve}, behind C{ds4tw-rpc-worker}) and the client side
(L{check_worker}, L{add_workers}, L{harden_sockets}) of a model whose
layers are spread over other machines.

What ggml-rpc does, read from the vendored source of llama-cpp-python
0.3.36 (C{vendor/llama.cpp/ggml/src/ggml-rpc/ggml-rpc.cpp} and
C{transport.cpp}), and what this module does about it:

  - Every client-side failure is C{GGML_ABORT}: a worker that is down,
    busy, of another protocol version or gone mid-computation aborts the
    whole process. So the model runs in a child process (the caller's
    concern), and L{check_worker} speaks the HELLO handshake in plain
    Python first, so a worker that is down at load is a L{WorkerDown}
    naming it, never an abort.
  - The client has no socket timeouts: a worker host that vanishes
    without a FIN or RST hangs ggml for ever. L{harden_sockets} turns on
    TCP keepalive and C{TCP_USER_TIMEOUT} on ggml's own sockets, so such
    a peer becomes an error (an abort of the child) within seconds.
  - Sockets: one C{rpc_dispatcher} per endpoint string, each with one TCP
    connection, kept in a map of weak references
    (C{get_dispatcher}). The connection lives only while something holds
    the dispatcher: the calls of C{ggml_backend_rpc_add_server} and of a
    device's memory query each connect, say HELLO, ask and close again;
    the model's weight buffers and backends hold it, so from the model
    load on there is exactly one connection per endpoint (whatever the
    number of devices behind it) until the model is freed. Hence
    L{harden_sockets} after the load.
  - C{ggml_backend_rpc_add_server} is idempotent per endpoint string (a
    map of registries); the devices it makes are named C{RPC<n>} with a
    process-wide counter and described by the endpoint. They are not
    added to ggml's global registry (llama.cpp's C{--rpc} does that):
    they reach llama.cpp through C{llama_model_params.devices} only, so
    counting ggml's devices still counts this machine's.
  - Hosts: the client splits an endpoint at its first C{:} and resolves
    the host with C{gethostbyname} into an C{AF_INET} socket: a hostname
    or an IPv4 address, never IPv6 (L{parse_endpoints} refuses it). The
    server binds with C{inet_addr}: an IPv4 address only, no hostname.
  - The server serves one client at a time from a listen backlog of one
    and has no stop call: L{serve} runs it in a daemon thread and ends
    the process on SIGINT or SIGTERM. It has no authentication: never
    let it face an untrusted network.

The library directory is llama-cpp-python's C{llama_cpp/lib}, or
C{$LLAMA_CPP_LIB_PATH} when set (the variable llama-cpp-python itself
honours for libllama), so pointing that variable at a directory without
C{libggml-rpc} makes this module see a build without RPC (the tests do).

Covered by tests/unit/test_rpc.py and tests/integration/test_rpc_worker.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import importlib.util
import ipaddress
import logging
import os
import shlex
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

log = logging.getLogger("ds4tw.rpc")

#: The protocol this build's client speaks: RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION
#: of ggml-rpc.h (vendor/llama.cpp/ggml/include/ggml-rpc.h:9-11 in
#: llama-cpp-python 0.3.36). The headers are not installed with the
#: package, so the number is written here; a worker is accepted when its
#: major is equal and its minor not greater (negotiate_hello in
#: ggml-rpc.cpp:347-364).
PROTOCOL = (7, 0, 0)

#: ggml-rpc.cpp:60-84: the command byte of HELLO (asserted to stay 14).
RPC_CMD_HELLO = 14
#: transport.h:11: the capability bytes in the HELLO request and reply.
RPC_CONN_CAPS_SIZE = 24
#: ggml-rpc.cpp:88-98: rpc_msg_hello_req is the caps alone;
#: rpc_msg_hello_rsp is major, minor, patch, a padding byte, then the caps.
HELLO_REQUEST_SIZE = RPC_CONN_CAPS_SIZE
HELLO_REPLY_SIZE = 4 + RPC_CONN_CAPS_SIZE

#: llama.cpp's rpc-server default port (tools/rpc/rpc-server.cpp).
DEFAULT_PORT = 50052

#: The version pinned by scripts/install-llama.sh and ds4tw's tests.
PINNED_VERSION = "0.3.36"


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _install_command() -> str:
    installed = _installed_version()
    spec = f"llama-cpp-python=={installed}" if installed else "llama-cpp-python"
    return (
        f'CMAKE_ARGS="-DGGML_RPC=ON" {shlex.quote(sys.executable)} -m pip install '
        "--force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python "
        f"{spec}"
    )


#: The one command that replaces the installed llama-cpp-python by the
#: same version built from source with llama.cpp's RPC backend. pip's
#: wheel cache ignores CMAKE_ARGS (it would silently reuse a wheel built
#: without RPC), hence --no-binary and --no-cache-dir.
INSTALL_COMMAND = _install_command()


class RPCUnavailable(RuntimeError):
    """
    The installed llama-cpp-python has no RPC backend (or there is no
    llama-cpp-python at all). The message says what is missing and gives
    L{INSTALL_COMMAND}.
    """

    def __init__(self, missing: str) -> None:
        super().__init__(
            f"llama.cpp's RPC backend is not in this llama-cpp-python build: {missing}. "
            "Install the same version built with -DGGML_RPC=ON (several minutes, a C++ "
            f"compiler and CMake needed):\n    {INSTALL_COMMAND}\n"
            "(add your other flags to CMAKE_ARGS, e.g. "
            '"-DGGML_RPC=ON -DGGML_CUDA=on" for CUDA and RPC; from a ds4tw checkout '
            "scripts/install-llama.sh does this, with CMAKE_ARGS from the environment, "
            "and caches the wheel)"
        )
        self.missing = missing

    def __reduce__(self) -> tuple[Any, ...]:
        return (RPCUnavailable, (self.missing,))


@dataclass(frozen=True)
class Endpoint:
    """A worker's address as ggml-rpc's client takes it: a hostname or an IPv4 address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class WorkerDown(ConnectionError):
    """
    An RPC worker did not answer as one: refused, timed out, busy with
    another client, of another protocol version, or closed the connection.

    @ivar endpoint: the worker.
    @ivar reason: why, in words (also in the message).
    """

    def __init__(self, endpoint: Endpoint, reason: str) -> None:
        super().__init__(f"RPC worker {endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in the model's child process, re-raised in the server's.
        return (WorkerDown, (self.endpoint, self.reason))


def parse_endpoints(spec: str) -> tuple[Endpoint, ...]:
    """
    C{"HOST:PORT[,HOST:PORT...]"} as ggml-rpc's client accepts them.

    @raise ValueError: an empty list or entry, a missing or bad port, a
        host ggml-rpc could not use (IPv6: its client splits at the first
        colon and connects over IPv4 only), or the same endpoint twice.
    """
    entries = [entry.strip() for entry in spec.split(",")]
    if not spec.strip():
        raise ValueError("no RPC worker given: expected HOST:PORT[,HOST:PORT...]")
    endpoints: list[Endpoint] = []
    for entry in entries:
        endpoint = _parse_endpoint(entry)
        if endpoint in endpoints:
            raise ValueError(f"RPC worker {endpoint} is given twice")
        endpoints.append(endpoint)
    return tuple(endpoints)


def _parse_endpoint(entry: str) -> Endpoint:
    if not entry:
        raise ValueError("an empty RPC worker in the list: expected HOST:PORT[,HOST:PORT...]")
    if entry.startswith("[") or entry.count(":") > 1:
        raise ValueError(
            f"RPC worker {entry!r}: IPv6 is not supported by llama.cpp's RPC client "
            "(IPv4 only); use an IPv4 address or a hostname"
        )
    host, sep, port_text = entry.rpartition(":")
    if not sep:
        raise ValueError(f"RPC worker {entry!r}: expected HOST:PORT")
    if not host:
        raise ValueError(f"RPC worker {entry!r}: no host before the port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"RPC worker {entry!r}: the port must be a number from 1 to 65535")
    if not _is_hostname_or_ipv4(host):
        raise ValueError(f"RPC worker {entry!r}: {host!r} is not a hostname or an IPv4 address")
    return Endpoint(host, int(port_text))


def _is_hostname_or_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        pass
    if len(host) > 253 or host.replace(".", "").isdigit():
        # All digits and dots but not a dotted quad: gethostbyname would
        # read "10.1" as 10.0.0.1; refuse the ambiguity.
        return False
    labels = host.rstrip(".").split(".")
    return all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isalnum() or c in "-_" for c in label)
        and label.isascii()
        for label in labels
    )


# -- the libraries -----------------------------------------------------------------------


def lib_dir() -> Path:
    """
    Where llama-cpp-python's shared libraries are: C{$LLAMA_CPP_LIB_PATH}
    if set, else C{llama_cpp/lib} of the installed package (found without
    importing it).

    @raise RPCUnavailable: llama-cpp-python is not installed.
    """
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RPCUnavailable("llama-cpp-python is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _lib_names(base: str) -> tuple[str, ...]:
    # The names llama_cpp._ctypes_extensions.load_shared_library tries.
    if sys.platform == "win32":
        return (f"{base}.dll", f"lib{base}.dll")
    if sys.platform == "darwin":
        return (f"lib{base}.so", f"lib{base}.dylib")
    return (f"lib{base}.so",)


def library(directory: Path | None = None) -> ctypes.CDLL:
    """
    C{libggml-rpc} of llama-cpp-python (or of C{directory}), its
    functions typed. Loaded once per directory.

    @raise RPCUnavailable: there is no C{libggml-rpc} there (a build
        without C{-DGGML_RPC=ON}), or it does not load.
    """
    return _rpc_library(directory if directory is not None else lib_dir())


def available() -> bool:
    """Whether the installed llama-cpp-python has the RPC backend (loads it to know)."""
    try:
        library()
    except RPCUnavailable:
        return False
    return True


def _load(directory: Path, base: str) -> ctypes.CDLL:
    if not any((directory / name).exists() for name in _lib_names(base)):
        raise RPCUnavailable(f"no {_lib_names(base)[0]} in {directory}")
    try:
        return linked_library(base, directory)
    except (OSError, RuntimeError) as e:
        raise RPCUnavailable(f"{_lib_names(base)[0]} in {directory} does not load ({e})") from e


def linked_library(base: str, directory: Path | None = None) -> ctypes.CDLL:
    """
    The copy of ggml's library C{base} (C{"ggml"}, C{"ggml-rpc"}) that
    libllama itself uses. A wheel holds no symlinks: C{libggml.so} and
    C{libggml.so.0} are two files, and loading the first beside libllama
    (which links the second by its soname) gives a second ggml with its
    own device registry, where workers registered are invisible to
    llama.cpp (seen: "offloaded 20/31 layers" and every layer on the CPU).

    @raise OSError: it does not load.
    """
    directory = directory if directory is not None else lib_dir()
    # Imported only now: importing llama_cpp loads libllama from the same
    # directory, which may not exist when there is no RPC library either.
    import llama_cpp  # noqa: F401  (libllama and the libraries it links, first)
    from llama_cpp._ctypes_extensions import load_shared_library

    linked = directory / f"lib{base}.so.0"
    if sys.platform.startswith("linux") and linked.exists():
        # The path libllama's RUNPATH resolved: dlopen hands back that handle.
        return ctypes.CDLL(str(linked))
    lib: ctypes.CDLL = load_shared_library(base, directory)
    return lib


@functools.cache
def _rpc_library(directory: Path) -> ctypes.CDLL:
    lib = _load(directory, "ggml-rpc")
    p = ctypes.c_void_p
    lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_add_server.restype = p
    lib.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.POINTER(p),
    ]
    lib.ggml_backend_rpc_start_server.restype = None
    lib.ggml_backend_rpc_get_device_memory.argtypes = [
        ctypes.c_char_p,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.ggml_backend_rpc_get_device_memory.restype = None
    return lib


@functools.cache
def _ggml_library(directory: Path) -> ctypes.CDLL:
    """libggml: the device registry, and through it libggml-base's device calls."""
    lib = _load(directory, "ggml")
    p = ctypes.c_void_p
    size_p = ctypes.POINTER(ctypes.c_size_t)
    signatures: dict[str, tuple[list[type], type | None]] = {
        "ggml_backend_dev_count": ([], ctypes.c_size_t),
        "ggml_backend_dev_get": ([ctypes.c_size_t], p),
        "ggml_backend_dev_by_name": ([ctypes.c_char_p], p),
        "ggml_backend_dev_type": ([p], ctypes.c_int),
        "ggml_backend_dev_name": ([p], ctypes.c_char_p),
        "ggml_backend_dev_description": ([p], ctypes.c_char_p),
        "ggml_backend_dev_memory": ([p, size_p, size_p], None),
        "ggml_backend_reg_dev_count": ([p], ctypes.c_size_t),
        "ggml_backend_reg_dev_get": ([p, ctypes.c_size_t], p),
        "ggml_backend_register": ([p], None),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = res
    return lib


def ggml_library() -> ctypes.CDLL:
    """libggml as libllama links it (L{linked_library}), its device calls typed."""
    return _ggml_library(lib_dir())


def _memory(ggml: ctypes.CDLL, dev: int) -> tuple[int, int]:
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return int(free.value), int(total.value)


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", "replace")


# -- the client side -----------------------------------------------------------------------


def gone(endpoint: Endpoint, timeout: float = 1.0) -> str | None:
    """
    Why the worker at C{endpoint} is certainly gone (its host answers
    that nothing listens there), or None: it is there, or this cannot
    tell. For a server's idle probe while the worker serves it: a worker
    never answers a second client (L{check_worker} would call it busy),
    and its listen backlog holds two, so a connect that times out says
    nothing; only a refusal does. The connection is closed at once, and
    the worker drops it unread when it next accepts.
    """
    try:
        address = socket.gethostbyname(endpoint.host)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, endpoint.port))
        except ConnectionRefusedError:
            return f"RPC worker {endpoint}: connection refused (the worker is gone)"
        except OSError:
            return None
    return None


def check_worker(endpoint: Endpoint, timeout: float = 5.0) -> tuple[int, int, int]:
    """
    Connect to C{endpoint} and say HELLO as ggml-rpc's client does
    (C{negotiate_hello}), from Python, where a failure is an exception
    rather than an abort. The connection is closed cleanly after the
    reply, and the worker goes back to C{accept()}.

    @param timeout: seconds for the connect and for the reply each.
    @return: the worker's protocol version (major, minor, patch), one this
        build's client accepts.
    @raise WorkerDown: the host does not resolve; the connection is
        refused or times out; the worker accepts but does not answer
        within C{timeout} (busy: ggml-rpc serves one client at a time, and
        a second connection waits in the listen backlog unanswered); it
        closes the connection; or it speaks another protocol version.
    """
    try:
        address = socket.gethostbyname(endpoint.host)
    except OSError as e:
        raise WorkerDown(endpoint, f"cannot resolve {endpoint.host!r} ({e})") from None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect((address, endpoint.port))
        except ConnectionRefusedError:
            raise WorkerDown(endpoint, "connection refused (no worker listening)") from None
        except TimeoutError:
            raise WorkerDown(
                endpoint,
                f"connect timed out after {timeout:g} s (host unreachable, or the worker's "
                "listen backlog full of waiting clients)",
            ) from None
        except OSError as e:
            raise WorkerDown(endpoint, f"cannot connect ({e.strerror or e})") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # ggml-rpc.cpp:314-326 (send_rpc_cmd): | cmd (1 byte) | size (8 bytes) | request |;
        # the request is rpc_msg_hello_req, its caps all zero for plain TCP
        # (transport.cpp: get_caps without RDMA).
        request = struct.pack("<BQ", RPC_CMD_HELLO, HELLO_REQUEST_SIZE) + bytes(HELLO_REQUEST_SIZE)
        try:
            sock.sendall(request)
            # ggml-rpc.cpp:330-340: | size (8 bytes) | rpc_msg_hello_rsp |.
            (size,) = struct.unpack("<Q", _recv_exactly(sock, 8))
            if size != HELLO_REPLY_SIZE:
                raise WorkerDown(
                    endpoint,
                    f"protocol version mismatch: a HELLO reply of {size} bytes, not "
                    f"{HELLO_REPLY_SIZE} (this client speaks {version(PROTOCOL)})",
                )
            reply = _recv_exactly(sock, HELLO_REPLY_SIZE)
        except TimeoutError:
            raise WorkerDown(
                endpoint,
                f"no answer to HELLO within {timeout:g} s: busy with another client "
                "(a worker serves one client at a time), stuck, or not an RPC worker",
            ) from None
        except _Closed:
            raise WorkerDown(
                endpoint,
                "closed the connection during HELLO (a worker of an incompatible protocol "
                f"version, this client speaks {version(PROTOCOL)}, or not an RPC worker)",
            ) from None
        except OSError as e:
            raise WorkerDown(
                endpoint, f"connection lost during HELLO ({e.strerror or e})"
            ) from None
        theirs = (reply[0], reply[1], reply[2])
        if theirs[0] != PROTOCOL[0] or theirs[1] > PROTOCOL[1]:
            raise WorkerDown(
                endpoint,
                f"protocol version mismatch: the worker speaks {version(theirs)}, this "
                f"client {version(PROTOCOL)} (run the same llama.cpp on both sides)",
            )
        # A clean close: the worker reads EOF for its next command, ends
        # this client and accepts the next.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return theirs
    finally:
        sock.close()


class _Closed(Exception):
    pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise _Closed
        data += chunk
    return data


def version(v: tuple[int, int, int] = PROTOCOL) -> str:
    """C{"7.0.0"}: a protocol version (by default this client's) in words."""
    return ".".join(map(str, v))


@dataclass(frozen=True)
class WorkerDevice:
    """
    One device of an RPC worker, as this process's ggml sees it.

    @ivar index: the device's number on its worker.
    @ivar name: ggml's name for it here (C{RPC0}, C{RPC1}, ...: numbered
        across all workers in this process).
    @ivar description: ggml's description (the endpoint).
    @ivar free: bytes free on the worker's device, as it reported them.
    @ivar total: bytes in all.
    @ivar handle: the C{ggml_backend_dev_t}, for C{llama_model_params.devices}.
    @ivar registry: the worker's own C{ggml_backend_reg_t} (one per
        endpoint; not its devices' shared "RPC" registry), for
        C{ggml_backend_register}.
    """

    endpoint: Endpoint
    index: int
    name: str
    description: str
    free: int
    total: int
    handle: int
    registry: int


def add_workers(endpoints: Sequence[Endpoint], timeout: float = 5.0) -> list[WorkerDevice]:
    """
    Make each worker's devices known to this process's ggml and list them.

    Each worker is checked first (L{check_worker}): a worker that is down
    is a L{WorkerDown} naming it, where ggml would abort the process.
    Only then does ggml connect (C{ggml_backend_rpc_add_server}, which
    asks the device count, and one memory query per device, each on a
    connection of its own that ggml closes again: see the module
    docstring). A worker that goes down between the check and ggml's own
    connection still aborts the process: call this where the model will
    load, in a child process.

    Idempotent per endpoint, as ggml's registry of servers is: a second
    call gives the same devices (their memory asked again).

    @raise RPCUnavailable: this build has no RPC backend.
    @raise WorkerDown: a worker did not answer HELLO as one.
    """
    rpc = library()
    ggml = ggml_library()
    devices: list[WorkerDevice] = []
    for endpoint in endpoints:
        check_worker(endpoint, timeout)
        reg = rpc.ggml_backend_rpc_add_server(str(endpoint).encode())
        if not reg:
            raise WorkerDown(endpoint, "the worker has no devices")
        for index in range(ggml.ggml_backend_reg_dev_count(reg)):
            dev = ggml.ggml_backend_reg_dev_get(reg, index)
            free, total = _memory(ggml, dev)
            devices.append(
                WorkerDevice(
                    endpoint=endpoint,
                    index=index,
                    name=_text(ggml.ggml_backend_dev_name(dev)),
                    description=_text(ggml.ggml_backend_dev_description(dev)),
                    free=free,
                    total=total,
                    handle=int(dev),
                    registry=int(reg),
                )
            )
    return devices


def _socket_fds() -> Iterator[int]:
    """This process's open file descriptors that are sockets (Linux, macOS)."""
    for root in ("/proc/self/fd", "/dev/fd"):
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            if not name.isdigit():
                continue
            fd = int(name)
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    yield fd
            except OSError:
                continue  # closed meanwhile, or the listing's own descriptor
        return


def _with_socket(fd: int, use: Callable[[socket.socket], bool]) -> bool:
    """
    Call C{use} with a socket object on a duplicate of C{fd}: options set
    on it are the original socket's; closing it closes the duplicate only.
    """
    try:
        dup = os.dup(fd)
    except OSError:
        return False
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return False
    try:
        return use(sock)
    except OSError:
        return False
    finally:
        sock.close()


def harden_sockets(
    endpoints: Sequence[Endpoint],
    *,
    idle: int = 5,
    interval: int = 2,
    count: int = 3,
    user_timeout_ms: int = 15000,
) -> int:
    """
    Turn on TCP keepalive (probes after C{idle} s of silence, every
    C{interval} s, C{count} of them) and C{TCP_USER_TIMEOUT} (unacknowledged
    data for C{user_timeout_ms}) on this process's TCP connections to
    C{endpoints}: ggml's, which have no timeouts of their own. A worker
    host that vanishes without a FIN or RST then makes ggml's next read
    or write fail within about C{idle + interval * count} seconds (an
    abort of the process, which its parent sees), where it would hang
    for ever.

    ggml holds a connection to a worker only while a model (or a backend)
    uses it: call this after the model is loaded (add_server's own
    connections are closed by the time it returns). The descriptors are
    found by their peer address and never closed (options are set through
    a duplicate).

    @return: how many sockets were set.
    """
    peers: set[tuple[str, int]] = set()
    for endpoint in endpoints:
        try:
            peers.add((socket.gethostbyname(endpoint.host), endpoint.port))
        except OSError:
            continue

    def harden(sock: socket.socket) -> bool:
        if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
            return False
        if sock.getpeername() not in peers:
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", idle),
            ("TCP_KEEPALIVE", idle),  # macOS's name for the idle time
            ("TCP_KEEPINTVL", interval),
            ("TCP_KEEPCNT", count),
            ("TCP_USER_TIMEOUT", user_timeout_ms),
        ):
            number = getattr(socket, option, None)
            if number is not None:
                sock.setsockopt(socket.IPPROTO_TCP, number, value)
        return True

    if not peers:
        return 0
    return sum(_with_socket(fd, harden) for fd in _socket_fds())


# -- the worker side -----------------------------------------------------------------------


@dataclass(frozen=True)
class LocalDevice:
    """A device of this machine's ggml, as C{--device} names it."""

    name: str
    description: str
    kind: str
    free: int
    total: int
    handle: int

    def __str__(self) -> str:
        return (
            f"{self.name}: {self.description} ({self.total // 2**20} MiB, "
            f"{self.free // 2**20} MiB free)"
        )


#: enum ggml_backend_dev_type (ggml-backend.h).
_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "IGPU", 3: "ACCEL"}


def local_devices() -> list[LocalDevice]:
    """
    This machine's ggml devices, in ggml's order.

    @raise RPCUnavailable: there is no libggml (or no llama-cpp-python).
    """
    ggml = ggml_library()
    devices = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = _memory(ggml, dev)
        devices.append(
            LocalDevice(
                name=_text(ggml.ggml_backend_dev_name(dev)),
                description=_text(ggml.ggml_backend_dev_description(dev)),
                kind=_DEVICE_TYPES.get(ggml.ggml_backend_dev_type(dev), "?"),
                free=free,
                total=total,
                handle=int(dev),
            )
        )
    return devices


def select_devices(names: Sequence[str] = ()) -> list[LocalDevice]:
    """
    The devices a worker serves: those named (ggml's names, e.g. C{CPU},
    C{CUDA0}; case-insensitive as ggml's lookup), or by default what
    llama.cpp's rpc-server serves: every GPU (discrete or integrated),
    else the CPU.

    @raise ValueError: an unknown name (the message lists the devices).
    """
    devices = local_devices()
    if names:
        by_name = {d.name.lower(): d for d in devices}
        chosen = []
        for name in names:
            device = by_name.get(name.lower())
            if device is None:
                listing = "\n".join(f"  {d}" for d in devices)
                raise ValueError(f"unknown device {name!r}; this machine has:\n{listing}")
            chosen.append(device)
        return chosen
    gpus = [d for d in devices if d.kind in ("GPU", "IGPU")]
    return gpus or [d for d in devices if d.kind == "CPU"][:1]


def default_cache_dir() -> Path:
    """
    Where llama.cpp's rpc-server keeps its tensor cache with C{-c}:
    C{$LLAMA_CACHE/rpc}, else C{$XDG_CACHE_HOME/llama.cpp/rpc}, else
    C{~/.cache/llama.cpp/rpc} (C{~/Library/Caches/llama.cpp/rpc} on
    macOS, C{%LOCALAPPDATA%/llama.cpp/rpc} on Windows).
    """
    if os.environ.get("LLAMA_CACHE"):
        return Path(os.environ["LLAMA_CACHE"]) / "rpc"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llama.cpp" / "rpc"


def check_listen_host(host: str) -> ipaddress.IPv4Address:
    """
    The address a worker may bind: an IPv4 address (ggml-rpc's server
    binds with C{inet_addr}, which takes no hostname and no IPv6).

    @raise ValueError: anything else.
    """
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IPv4 address: llama.cpp's RPC server binds an IPv4 "
            "address only (no hostname, no IPv6)"
        ) from None
    if address == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{host!r} cannot be bound")
    return address


def _listening(port: int) -> bool:
    """Whether this process has a listening socket on C{port} (Linux, macOS)."""

    def check(sock: socket.socket) -> bool:
        return bool(
            sock.family == socket.AF_INET
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            and sock.getsockname()[1] == port
        )

    return any(_with_socket(fd, check) for fd in _socket_fds())


def _libc_stdout(action: str) -> None:
    """Line-buffer or flush C's stdout, where the RPC server prints its lines."""
    try:
        libc = ctypes.CDLL(None)
        if action == "flush":
            libc.fflush(None)
        elif sys.platform.startswith("linux"):
            stdout = ctypes.c_void_p.in_dll(libc, "stdout")
            libc.setvbuf(stdout, None, 1, 0)  # _IOLBF
    except (OSError, AttributeError, ValueError):
        pass


def serve(
    endpoint: Endpoint,
    *,
    threads: int,
    cache_dir: str | None,
    devices: Sequence[str] = (),
) -> NoReturn:
    """
    Run llama.cpp's RPC server (C{ggml_backend_rpc_start_server}) on this
    machine's C{devices} (L{select_devices}) until SIGINT or SIGTERM, then
    end the process (C{os._exit(0)}: the server has no stop call). If the
    server cannot listen (the port taken, an address not of this host) the
    process ends with status 1.

    It logs a line once the port listens, and a warning when the host is
    not a loopback address: the server has no authentication, and whoever
    reaches the port can run computations on this machine and read or
    overwrite its buffers.

    @param threads: threads of the CPU device.
    @param cache_dir: a directory where the server keeps tensors it was
        sent, by hash, so a client loading the same model again sends
        hashes instead of data (llama.cpp's rpc-server C{-c}); None: no
        cache.
    @raise RPCUnavailable: this build has no RPC backend.
    @raise ValueError: a bad host, port, thread count or device name.
    """
    address = check_listen_host(endpoint.host)
    if not 0 < endpoint.port < 65536:
        raise ValueError(f"port {endpoint.port}: expected 1 to 65535")
    if threads < 1:
        raise ValueError(f"threads {threads}: expected at least 1")
    rpc = library()
    chosen = select_devices(devices)
    if not chosen:
        raise ValueError("this machine's ggml has no device to serve")
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    if not address.is_loopback:
        log.warning(
            "WARNING: listening on %s, not a loopback address. llama.cpp's RPC server has "
            "no authentication: anyone who reaches this port can use this machine. Never "
            "expose it to an untrusted network; keep it on a private network or behind an "
            "SSH or WireGuard tunnel.",
            endpoint.host,
        )

    stop = threading.Event()
    ended = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    handles = (ctypes.c_void_p * len(chosen))(*(d.handle for d in chosen))
    _libc_stdout("line-buffer")

    def run() -> None:
        try:
            rpc.ggml_backend_rpc_start_server(
                str(endpoint).encode(),
                cache_dir.encode() if cache_dir is not None else None,
                threads,
                len(chosen),
                handles,
            )
        finally:
            ended.set()
            stop.set()

    thread = threading.Thread(target=run, name="ggml-rpc-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    announced = False
    while not stop.is_set():
        if not announced and (_listening(endpoint.port) or time.monotonic() > deadline):
            log.info(
                "RPC worker listening on %s (protocol %s): %s; %d threads; cache %s",
                endpoint,
                version(PROTOCOL),
                ", ".join(d.name for d in chosen),
                threads,
                cache_dir or "off",
            )
            announced = True
        stop.wait(0.02 if not announced else 0.5)
    _libc_stdout("flush")
    if ended.is_set():
        log.error(
            "RPC worker could not listen on %s (port in use, or not an address of this host)",
            endpoint,
        )
        os._exit(1)
    log.info("RPC worker on %s stopped", endpoint)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(0)
