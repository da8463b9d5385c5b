"""
A GGUF file's header, read in Python: its key-value metadata with the
types the file gives them, and its tensors' shapes, without a byte of
the weights (the file is memory-mapped; only the header's pages are read).

llama.cpp's own reading (L{ds4tw._engine.llama._metadata}) gives every
value as text (floats printed with six decimals, so C{1e-06} survives but
C{1e-12} does not) and leaves the arrays out; Ollama's C{/api/show} gives
them typed, and its clients read them as numbers (VS Code Copilot takes
C{<arch>.context_length} for the context window). So this reads the file
as Ollama's C{fs/ggml/gguf.go} does: scalars typed, arrays kept only up to
C{max_array} elements (longer ones are C{None}: Ollama's JSON C{null}),
and C{general.parameter_count} the sum of the tensors' elements, which is
what Ollama reports (the file's own key, when it has one, is overwritten
the same way).

Covered by tests/unit/test_ollama_models.py (a GGUF written by the test,
and the demo model when it is installed).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["FILE_TYPES", "GGUFHeader", "ModelFile", "file_type_name", "read_header"]


@runtime_checkable
class ModelFile(Protocol):
    """
    An engine or embedder whose model is a GGUF file (L{ds4tw._engine.llama.LlamaEngine},
    L{ds4tw._engine.embed.LlamaEmbedder}; the scripted ones have none): what
    Ollama's model routes read its header, size and date from.
    """

    model_path: Path


# Value types, as the GGUF specification numbers them.
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6

#: C{general.file_type} as Ollama names it (C{fs/ggml/type.go}, C{FileType.String}).
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}


def file_type_name(value: object) -> str:
    """A C{general.file_type} as Ollama's C{quantization_level} says it."""
    return FILE_TYPES.get(value, "unknown") if isinstance(value, int) else "unknown"


@dataclass(frozen=True)
class GGUFHeader:
    """
    @ivar metadata: every key, typed (ints, floats, bools, strings; arrays
        as lists, or None when longer than the reader kept), with
        C{general.parameter_count} set to the tensors' element count.
    @ivar array_lengths: every array key's true length.
    """

    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    parameter_count: int
    tensor_count: int


def _float32(value: float) -> float:
    """A float32 as its shortest decimal (Go's JSON writes C{1e-05}, not C{9.99999974e-06})."""
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if struct.pack("<f", short) == struct.pack("<f", value):
            return short
    return value


class _Reader:
    def __init__(self, data: mmap.mmap | bytes, max_array: int | None) -> None:
        self.data = data
        self.pos = 0
        self.max_array = max_array

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.data[self.pos : self.pos + n]
        if len(raw) != n:
            raise ValueError("the GGUF header ends inside a string")
        self.pos += n
        return bytes(raw).decode("utf-8", "replace")

    def skip_string(self) -> None:
        n = self.unpack("<Q")  # (not "pos += unpack()": that adds to the old pos)
        self.pos += n

    def value(self, kind: int, lengths: dict[str, int], key: str) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            return self.array(lengths, key)
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise ValueError(f"unknown GGUF value type {kind} for {key}")
        value = self.unpack(fmt)
        return _float32(value) if kind == _FLOAT32 else value

    def array(self, lengths: dict[str, int], key: str) -> list[Any] | None:
        kind = self.unpack("<I")
        count = self.unpack("<Q")
        lengths[key] = count
        keep = self.max_array is None or count <= self.max_array
        if kind == _STRING:
            if keep:
                return [self.string() for _ in range(count)]
            for _ in range(count):
                self.skip_string()
            return None
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise ValueError(f"GGUF array {key} has elements of type {kind}")
        if not keep:
            self.pos += struct.calcsize(fmt) * count
            return None
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.data, self.pos))
        self.pos += struct.calcsize(fmt) * count
        return [_float32(v) for v in values] if kind == _FLOAT32 else values


def _read(
    data: mmap.mmap | bytes, max_array: int | None
) -> tuple[dict[str, Any], dict[str, int], int, int]:
    r = _Reader(data, max_array)
    if bytes(data[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (no GGUF magic)")
    r.pos = 4
    version = r.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not read here (2 and 3 are)")
    n_tensors = r.unpack("<Q")
    n_kv = r.unpack("<Q")
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.unpack("<I"), lengths, key)
    parameters = 0
    for _ in range(n_tensors):
        r.skip_string()  # the name
        dims = r.unpack("<I")
        elements = 1
        for _ in range(dims):
            elements *= r.unpack("<Q")
        r.pos += 4 + 8  # its type and offset
        parameters += elements
    return metadata, lengths, parameters, n_tensors


def read_header(paths: Sequence[Path], *, max_array: int | None = 0) -> GGUFHeader:
    """
    The header of the GGUF at C{paths[0]}, with the parameters of every
    shard in C{paths} (a split GGUF: L{ds4tw._engine.llama.model_files}).
    Arrays longer than C{max_array} elements are None (None: keep all).
    Any thread; raises ValueError for a file that is not a GGUF.
    """
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    parameters = tensors = 0
    for i, path in enumerate(paths):
        # The other shards' metadata is only their split.* keys: arrays unread.
        kv, n, p, t = _mapped(path, max_array if i == 0 else 0)
        if i == 0:
            metadata, lengths = kv, n
        parameters += p
        tensors += t
    metadata["general.parameter_count"] = parameters
    return GGUFHeader(metadata, lengths, parameters, tensors)


def _mapped(path: Path, max_array: int | None) -> tuple[dict[str, Any], dict[str, int], int, int]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _read(data, max_array)
        except (struct.error, IndexError) as e:
            raise ValueError(f"{path}: the GGUF header is cut short or damaged ({e})") from e
