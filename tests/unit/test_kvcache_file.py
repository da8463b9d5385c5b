"""
The prompt cache's file format (L{ds4tw._engine.kvcache._file}): round trips,
atomic writes, and every way a file is rejected before its state is
loaded into the model.

The layout is parsed here with C{struct} from the format's documentation
(magic, version, header length, header, tokens, state, two CRCs), not
from the module's private helpers, so a change to the layout shows.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from ds4tw._engine.kvcache import _file
from ds4tw._engine.kvcache._file import Cancelled, Head, Rejected

IDENTITY: dict[str, Any] = {
    "model": "aaaaaaaaaaaaaaaa",
    "llama_cpp": "0.3.16",
    "kv_bytes_per_token": 4096,
    "type_k": 1,
    "type_v": 1,
}
TOKENS = [1, 15043, 2, 0, 2**32 - 1, 7, 7, 7]
STATE = bytes(range(256)) * 3 + b"tail"


@dataclass(frozen=True)
class Layout:
    """Where each part of a written file starts (from the documented format)."""

    header: int
    tokens: int
    state: int
    trailer: int
    end: int


def layout(data: bytes) -> Layout:
    magic, version, header_len = struct.unpack("<8sII", data[:16])
    assert magic == b"DS4TWKV\0" and version == _file.FORMAT_VERSION
    header = json.loads(data[16 : 16 + header_len])
    tokens_at = 16 + header_len
    state_at = tokens_at + 4 * header["n_tokens"]
    trailer_at = state_at + header["state_bytes"]
    return Layout(16, tokens_at, state_at, trailer_at, trailer_at + 8)


def saved(tmp_path: Path, **kw: Any) -> tuple[Head, bytes]:
    head = _file.write(tmp_path, IDENTITY, TOKENS, STATE, **kw)
    return head, head.path.read_bytes()


def rejected(path: Path, identity: dict[str, Any] | None = None) -> Rejected:
    with pytest.raises(Rejected) as info:
        _file.read_head(path, IDENTITY if identity is None else identity)
    assert info.value.reason in _file.REASONS
    return info.value


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- round trip -----------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    written = _file.write(tmp_path, IDENTITY, TOKENS, STATE, hits=5, created=1234.5)

    assert written.path == tmp_path / (_file.key_of(TOKENS) + ".kv")
    head = _file.read_head(written.path, IDENTITY)
    assert head == written
    assert head.tokens == tuple(TOKENS)
    assert head.hits == 5
    assert head.created == 1234.5
    assert head.state_bytes == len(STATE)
    assert head.size == written.path.stat().st_size
    state = _file.read_state(head)
    assert bytes(state) == STATE


def test_round_trip_accepts_a_memoryview_state(tmp_path: Path) -> None:
    head = _file.write(tmp_path, IDENTITY, TOKENS, memoryview(bytearray(STATE)))
    assert bytes(_file.read_state(_file.read_head(head.path, IDENTITY))) == STATE


def test_layout_matches_the_documented_format(tmp_path: Path) -> None:
    head, data = saved(tmp_path, hits=2, created=9.0)
    at = layout(data)

    assert at.end == len(data) == head.size
    assert at.state == head.state_offset
    assert json.loads(data[at.header : at.tokens]) == {
        "identity": IDENTITY,
        "n_tokens": len(TOKENS),
        "state_bytes": len(STATE),
        "hits": 2,
        "created": 9.0,
    }
    assert list(struct.unpack(f"<{len(TOKENS)}I", data[at.tokens : at.state])) == TOKENS
    assert data[at.state : at.trailer] == STATE
    head_crc, state_crc = struct.unpack("<II", data[at.trailer :])
    assert head_crc == zlib.crc32(data[: at.state])
    assert state_crc == zlib.crc32(STATE) == head.state_crc


def test_key_is_the_token_prefix() -> None:
    key = _file.key_of(TOKENS)
    assert len(key) == 32 and int(key, 16) >= 0
    assert _file.key_of(tuple(TOKENS)) == key
    assert _file.key_of(TOKENS[:-1]) != key
    assert _file.key_of(list(reversed(TOKENS))) != key


def test_same_prefix_saved_twice_is_one_file(tmp_path: Path) -> None:
    _file.write(tmp_path, IDENTITY, TOKENS, b"old state")
    head = _file.write(tmp_path, IDENTITY, TOKENS, b"the new state")

    assert listing(tmp_path) == [head.path.name]
    assert bytes(_file.read_state(_file.read_head(head.path, IDENTITY))) == b"the new state"


# -- atomic writes ----------------------------------------------------------------


def test_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    head = _file.write(tmp_path, IDENTITY, TOKENS, STATE)
    assert listing(tmp_path) == [head.path.name]


def enospc(*args: Any) -> NoReturn:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_fsync_leaves_nothing_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError) as info:
        _file.write(tmp_path, IDENTITY, TOKENS, STATE)
    assert info.value.errno == errno.ENOSPC
    assert listing(tmp_path) == []


class FullDisk(io.BufferedWriter):
    """A file whose second write fails (the head is on disk, the state is not)."""

    writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        if self.writes > 1:
            enospc()
        return super().write(data)


def test_failed_write_midway_leaves_nothing_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []

    def full_disk_open(path: Path, mode: str) -> FullDisk:
        assert mode == "wb"
        seen.append(Path(path))
        return FullDisk(io.FileIO(path, "w"))

    monkeypatch.setattr(_file, "open", full_disk_open, raising=False)
    with pytest.raises(OSError) as info:
        _file.write(tmp_path, IDENTITY, TOKENS, STATE)
    assert info.value.errno == errno.ENOSPC
    # It did write a temporary file in the same directory, then removed it.
    assert [p.parent for p in seen] == [tmp_path]
    assert seen[0].name.endswith(_file.TMP_SUFFIX)
    assert listing(tmp_path) == []


def test_failed_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _file.write(tmp_path, IDENTITY, TOKENS, b"old state")
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError):
        _file.write(tmp_path, IDENTITY, TOKENS, b"the new state")
    monkeypatch.undo()

    assert listing(tmp_path) == [old.path.name]
    assert bytes(_file.read_state(_file.read_head(old.path, IDENTITY))) == b"old state"


def test_failed_directory_fsync_leaves_nothing_and_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        _file.write(tmp_path, IDENTITY, TOKENS, STATE)
    # write() promises no file left behind: the caller forgets the entry,
    # so a file here would sit outside the disk budget until a restart.
    assert listing(tmp_path) == []


# -- rejections -------------------------------------------------------------------


def test_foreign_identity_names_the_differing_keys(tmp_path: Path) -> None:
    head, _ = saved(tmp_path)
    mine = {**IDENTITY, "model": "bbbbbbbbbbbbbbbb", "flash_attn": 1}

    error = rejected(head.path, mine)
    assert error.reason == "foreign"
    assert "model" in error.detail and "flash_attn" in error.detail
    for same in ("llama_cpp", "kv_bytes_per_token", "type_k", "type_v"):
        assert same not in error.detail


def test_foreign_when_a_key_is_missing(tmp_path: Path) -> None:
    head, _ = saved(tmp_path)
    mine = {k: v for k, v in IDENTITY.items() if k != "type_v"}

    error = rejected(head.path, mine)
    assert error.reason == "foreign"
    assert "type_v" in error.detail


def test_another_format_version(tmp_path: Path) -> None:
    head, data = saved(tmp_path)
    head.path.write_bytes(data[:8] + struct.pack("<I", _file.FORMAT_VERSION + 1) + data[12:])
    assert rejected(head.path).reason == "format"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"GGUF" + bytes(60), id="another-magic"),
        pytest.param(bytes(range(256)) * 4, id="garbage"),
        pytest.param(b"\0" * 64, id="zeros"),
    ],
)
def test_not_one_of_ours(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.kv"
    path.write_bytes(content)
    assert rejected(path).reason == "corrupt"


def test_bad_magic_in_a_real_file(tmp_path: Path) -> None:
    head, data = saved(tmp_path)
    head.path.write_bytes(flipped(data, 3))
    assert rejected(head.path).reason == "corrupt"


def test_oversized_header(tmp_path: Path) -> None:
    path = tmp_path / "x.kv"
    path.write_bytes(_file.MAGIC + struct.pack("<II", 1, _file.MAX_HEADER + 1) + bytes(64))
    assert rejected(path).reason == "corrupt"


def write_raw(path: Path, header: Any) -> None:
    """A file around C{header} with one token and a one-byte state, checksums right."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    head = _file.MAGIC + struct.pack("<II", _file.FORMAT_VERSION, len(raw)) + raw
    head += struct.pack("<I", 5)
    path.write_bytes(head + b"s" + struct.pack("<II", zlib.crc32(head), zlib.crc32(b"s")))


def test_write_raw_makes_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "x.kv"
    write_raw(path, {"identity": IDENTITY, "n_tokens": 1, "state_bytes": 1})
    head = _file.read_head(path, IDENTITY)
    assert head.tokens == (5,)
    assert bytes(_file.read_state(head)) == b"s"


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param([1, 2], id="a-list"),
        pytest.param({"n_tokens": 1, "state_bytes": 1}, id="no-identity"),
        pytest.param({"identity": IDENTITY, "state_bytes": 1}, id="no-n-tokens"),
        pytest.param({"identity": IDENTITY, "n_tokens": "x", "state_bytes": 1}, id="bad-n"),
        pytest.param({"identity": IDENTITY, "n_tokens": 0, "state_bytes": 1}, id="no-tokens"),
        pytest.param({"identity": IDENTITY, "n_tokens": 1, "state_bytes": 0}, id="no-state"),
        pytest.param(
            {"identity": IDENTITY, "n_tokens": float("inf"), "state_bytes": 1}, id="infinity"
        ),
        pytest.param({"identity": "model", "n_tokens": 1, "state_bytes": 1}, id="identity-str"),
        pytest.param({"identity": [1], "n_tokens": 1, "state_bytes": 1}, id="identity-list"),
    ],
)
def test_bad_header(tmp_path: Path, header: Any) -> None:
    # The checksums match: what a buggy or foreign writer could leave. A
    # scan catches only Rejected and OSError, so anything else would stop it.
    path = tmp_path / "x.kv"
    write_raw(path, header)
    assert rejected(path).reason == "corrupt"


def test_huge_sizes_in_the_header_are_truncated_not_allocated(tmp_path: Path) -> None:
    path = tmp_path / "x.kv"
    write_raw(path, {"identity": IDENTITY, "n_tokens": 2**40, "state_bytes": 1})
    assert rejected(path).reason == "truncated"
    write_raw(path, {"identity": IDENTITY, "n_tokens": 1, "state_bytes": 2**50})
    assert rejected(path).reason == "truncated"


TRUNCATIONS: dict[str, Callable[[Layout], int]] = {
    "empty": lambda at: 0,
    "in-magic": lambda at: 5,
    "in-prelude": lambda at: 12,
    "after-prelude": lambda at: at.header,
    "in-header": lambda at: (at.header + at.tokens) // 2,
    "after-header": lambda at: at.tokens,
    "in-tokens": lambda at: at.tokens + 6,
    "after-tokens": lambda at: at.state,
    "in-state": lambda at: (at.state + at.trailer) // 2,
    "after-state": lambda at: at.trailer,
    "in-trailer": lambda at: at.trailer + 5,
    "one-byte-short": lambda at: at.end - 1,
}


@pytest.mark.parametrize("where", TRUNCATIONS)
def test_truncated(tmp_path: Path, where: str) -> None:
    head, data = saved(tmp_path)
    cut = TRUNCATIONS[where](layout(data))
    assert 0 <= cut < len(data)
    head.path.write_bytes(data[:cut])
    assert rejected(head.path).reason == "truncated"


def test_extra_bytes_past_the_end(tmp_path: Path) -> None:
    head, data = saved(tmp_path)
    head.path.write_bytes(data + b"\0")
    assert rejected(head.path).reason == "corrupt"


def header_byte(data: bytes, text: bytes) -> int:
    """The offset of C{text} in the header (a flip there keeps the JSON valid)."""
    at = layout(data)
    return data.index(text, at.header, at.tokens)


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda data: header_byte(data, b"aaaa"), id="header-identity"),
        pytest.param(lambda data: header_byte(data, b"0.3.16") + 2, id="header-version"),
        pytest.param(lambda data: header_byte(data, b'"type_k"') + 2, id="header-key"),
        pytest.param(lambda data: layout(data).header, id="header-json"),
        pytest.param(lambda data: layout(data).tokens, id="first-token"),
        pytest.param(lambda data: layout(data).state - 1, id="last-token"),
        pytest.param(lambda data: layout(data).trailer, id="head-crc"),
    ],
)
def test_flipped_byte_in_the_head(tmp_path: Path, where: Callable[[bytes], int]) -> None:
    head, data = saved(tmp_path)
    head.path.write_bytes(flipped(data, where(data)))
    # Checked before the identity: a damaged file is corrupt, not foreign.
    assert rejected(head.path).reason == "corrupt"


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(lambda at: at.state, id="first-state-byte"),
        pytest.param(lambda at: (at.state + at.trailer) // 2, id="mid-state"),
        pytest.param(lambda at: at.trailer - 1, id="last-state-byte"),
        pytest.param(lambda at: at.trailer + 4, id="state-crc"),
    ],
)
def test_flipped_byte_in_the_state(tmp_path: Path, where: Callable[[Layout], int]) -> None:
    written, data = saved(tmp_path)
    written.path.write_bytes(flipped(data, where(layout(data))))

    head = _file.read_head(written.path, IDENTITY)  # the scan does not read the state
    with pytest.raises(Rejected) as info:
        _file.read_state(head)
    assert info.value.reason == "corrupt"


# -- reading the state --------------------------------------------------------------


class Cancel:
    """A C{cancelled} callable that turns true after C{after} calls."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.after


def test_read_state_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_file, "CHUNK", 100)
    head, _ = saved(tmp_path)
    never = Cancel(after=10**9)

    assert bytes(_file.read_state(head, never)) == STATE
    assert never.calls == -(-len(STATE) // 100) > 1  # asked once per chunk


def test_read_state_cancelled_after_the_first_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_file, "CHUNK", 100)
    head, _ = saved(tmp_path)
    cancel = Cancel(after=1)

    with pytest.raises(Cancelled):
        _file.read_state(head, cancel)
    assert cancel.calls == 2


def test_read_state_cancelled_before_reading(tmp_path: Path) -> None:
    head, _ = saved(tmp_path)
    with pytest.raises(Cancelled):
        _file.read_state(head, lambda: True)


CHANGES: dict[str, Callable[[bytes], bytes]] = {
    "shrunk": lambda data: data[:-1],
    "state-cut": lambda data: data[: layout(data).state + 3],
    "grown": lambda data: data + b"\0",
}


@pytest.mark.parametrize("change", CHANGES)
def test_read_state_rejects_a_file_that_changed_size(tmp_path: Path, change: str) -> None:
    head, data = saved(tmp_path)
    scanned = _file.read_head(head.path, IDENTITY)
    head.path.write_bytes(CHANGES[change](data))

    with pytest.raises(Rejected) as info:
        _file.read_state(scanned)
    assert info.value.reason == "truncated"


def test_read_state_rejects_a_file_rewritten_since_the_scan(tmp_path: Path) -> None:
    scanned = _file.write(tmp_path, IDENTITY, TOKENS, b"A" * 64)
    _file.write(tmp_path, IDENTITY, TOKENS, b"B" * 64)  # same size, another state

    with pytest.raises(Rejected) as info:
        _file.read_state(scanned)
    assert info.value.reason == "corrupt"


def test_read_state_of_a_removed_file_is_an_os_error(tmp_path: Path) -> None:
    head, _ = saved(tmp_path)
    head.path.unlink()
    with pytest.raises(OSError):
        _file.read_state(head)
