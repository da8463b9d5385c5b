"""
The prompt cache's file format: one saved prefix state per file.

A file is::

    magic        8 bytes   b"DS4TWKV\\0"
    version      u32 LE    L{FORMAT_VERSION}
    header_len   u32 LE
    header       JSON      {"identity": {...}, "n_tokens": N, "state_bytes": S,
                            "hits": H, "created": T}
    tokens       N x u32 LE   the token prefix the state holds, in order
    state        S bytes      llama.cpp's per-sequence state (opaque here)
    head_crc     u32 LE    CRC-32 of everything from the magic to the tokens' end
    state_crc    u32 LE    CRC-32 of the state

Named C{<sha256 of the tokens' bytes, 32 hex digits>.kv}: the key is the
token prefix itself, so the same prefix saved twice is the same file.

Written atomically (L{write}): a temporary file in the same directory,
fsync, rename over the final name, fsync of the directory; a crash leaves
either the old state of the directory or the new one, plus at most a
C{.tmp} file that the next scan removes. L{read_head} checks the magic,
version, sizes (a truncated file is shorter than its header says) and
C{head_crc} without reading the state, so a scan of a large directory is
cheap; L{read_state} checks C{state_crc} before the state is used, so a
corrupt file is never loaded into the model.

Covered by tests/unit/test_kvcache_file.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"DS4TWKV\0"
FORMAT_VERSION = 1
SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
_PRELUDE = struct.Struct("<8sII")
_TRAILER = struct.Struct("<II")
#: A header longer than this is not one of ours (the scan reads it whole).
MAX_HEADER = 1 << 16
#: Reads and checksums go in chunks of this size, so that a cancelled
#: restore stops within one chunk.
CHUNK = 4 << 20


class Rejected(Exception):
    """
    A file that must not be loaded. C{reason} is one of L{REASONS}, the
    label of the rejected-files metric.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


#: Why a file was rejected: not ours or damaged (C{corrupt}), shorter
#: than its header says (C{truncated}), from another model or context
#: layout (C{foreign}), or written by another format version (C{format}).
REASONS = ("corrupt", "truncated", "foreign", "format")


class Cancelled(Exception):
    """A read stopped because its restore was cancelled."""


def key_of(tokens: Sequence[int]) -> str:
    """The file key of a token prefix."""
    return hashlib.sha256(_token_bytes(tokens)).hexdigest()[:32]


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


@dataclass(frozen=True)
class Head:
    """What a scan learns from a file without reading its state."""

    path: Path
    tokens: tuple[int, ...]
    state_bytes: int
    hits: int
    created: float
    #: Where the state starts in the file.
    state_offset: int
    state_crc: int
    #: The whole file's size in bytes (what the disk budget counts).
    size: int


def encode_head(
    identity: Mapping[str, Any], tokens: Sequence[int], state_bytes: int, hits: int, created: float
) -> bytes:
    header = json.dumps(
        {
            "identity": dict(identity),
            "n_tokens": len(tokens),
            "state_bytes": state_bytes,
            "hits": hits,
            "created": created,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return _PRELUDE.pack(MAGIC, FORMAT_VERSION, len(header)) + header + _token_bytes(tokens)


def file_size(head: bytes, state_bytes: int) -> int:
    return len(head) + state_bytes + _TRAILER.size


def write(
    directory: Path,
    identity: Mapping[str, Any],
    tokens: Sequence[int],
    state: bytes | bytearray | memoryview,
    *,
    hits: int = 0,
    created: float = 0.0,
) -> Head:
    """
    Write one state atomically; return its L{Head}. Raises L{OSError} (a
    full disk, a read-only directory) with no file left behind.
    """
    head = encode_head(identity, tokens, len(state), hits, created)
    state_crc = zlib.crc32(state)
    final = directory / (key_of(tokens) + SUFFIX)
    tmp = directory / f".{final.name}.{os.getpid()}{TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(state)
            f.write(_TRAILER.pack(zlib.crc32(head), state_crc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        _fsync_dir(directory)
    except BaseException:
        # The caller forgets a failed write: no file may outlive it.
        final.unlink(missing_ok=True)
        raise
    return Head(
        final,
        tuple(tokens),
        len(state),
        hits,
        created,
        len(head),
        state_crc,
        file_size(head, len(state)),
    )


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_head(path: Path, identity: Mapping[str, Any]) -> Head:
    """
    Read and check everything but the state. Raises L{Rejected} for a file
    that must not be loaded, L{OSError} when it cannot be read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prelude = f.read(_PRELUDE.size)
        if len(prelude) < _PRELUDE.size:
            raise Rejected("truncated", f"{size} bytes")
        magic, version, header_len = _PRELUDE.unpack(prelude)
        if magic != MAGIC:
            raise Rejected("corrupt", "not a ds4tw prompt-cache file")
        if version != FORMAT_VERSION:
            raise Rejected("format", f"format {version}, this ds4tw reads {FORMAT_VERSION}")
        if header_len > MAX_HEADER:
            raise Rejected("corrupt", f"a {header_len}-byte header")
        raw = f.read(header_len)
        if len(raw) < header_len:
            raise Rejected("truncated", f"{size} bytes")
        try:
            header = json.loads(raw)
            n_tokens = int(header["n_tokens"])
            state_bytes = int(header["state_bytes"])
            hits = int(header.get("hits", 0))
            created = float(header.get("created", 0.0))
            theirs = header["identity"]
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            raise Rejected("corrupt", f"bad header ({e})") from None
        if not isinstance(theirs, dict):
            raise Rejected("corrupt", "bad header (identity)")
        if n_tokens < 1 or state_bytes < 1:
            raise Rejected("corrupt", "an empty state")
        state_offset = _PRELUDE.size + header_len + 4 * n_tokens
        expected = state_offset + state_bytes + _TRAILER.size
        # Sizes first: the header is not checked yet, and a read of its
        # n_tokens would allocate that much.
        if size < expected:
            raise Rejected("truncated", f"{size} of {expected} bytes")
        if size > expected:
            raise Rejected("corrupt", f"{size - expected} bytes past the end")
        token_bytes = f.read(4 * n_tokens)
        f.seek(expected - _TRAILER.size)
        trailer = f.read(_TRAILER.size)
        if len(token_bytes) < 4 * n_tokens or len(trailer) < _TRAILER.size:
            raise Rejected("truncated", "the file shrank while it was read")
        head_crc, state_crc = _TRAILER.unpack(trailer)
    if zlib.crc32(prelude + raw + token_bytes) != head_crc:
        raise Rejected("corrupt", "header checksum mismatch")
    if theirs != dict(identity):
        differs = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
        raise Rejected("foreign", "saved with another " + ", ".join(differs))
    tokens = struct.unpack(f"<{n_tokens}I", token_bytes)
    return Head(path, tokens, state_bytes, hits, created, state_offset, state_crc, size)


def read_state(head: Head, cancelled: Callable[[], bool] = lambda: False) -> bytearray:
    """
    Read C{head}'s state and check its checksum, in L{CHUNK}s, asking
    C{cancelled} between them (raises L{Cancelled}). Raises L{Rejected}
    when the state is damaged or the file changed since its head was read.
    """
    data = bytearray(head.state_bytes)
    view = memoryview(data)
    crc = 0
    with open(head.path, "rb") as f:
        if os.fstat(f.fileno()).st_size != head.size:
            raise Rejected("truncated", "the file changed size since it was scanned")
        f.seek(head.state_offset)
        at = 0
        while at < head.state_bytes:
            if cancelled():
                raise Cancelled
            n = f.readinto(view[at : at + CHUNK])
            if not n:
                raise Rejected("truncated", f"the state ends at {at} of {head.state_bytes} bytes")
            crc = zlib.crc32(view[at : at + n], crc)
            at += n
    if crc != head.state_crc:
        raise Rejected("corrupt", "state checksum mismatch")
    return data
