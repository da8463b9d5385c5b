"""
The prompt cache: saved prefix states in memory and on disk.

Beyond the sequences the context holds (the retained slots,
L{ds4tw._engine.slots}), a L{PromptCache} keeps prefix states in two tiers, each
a L{PrefixIndex} under its own byte budget:

  - B{memory} (C{--cache-ram-mb}): a slot's state is saved here when the
    slot is given to another conversation, so alternating between more
    conversations than there are slots keeps every one's prefix;
  - B{disk} (C{--kv-disk-dir}, C{--kv-disk-space-mb}): a state is written
    when a long prompt has just been prefilled (at least C{min_tokens}
    computed, not restored), when memory evicts it, and at shutdown; the
    directory is scanned at start, so a restart keeps them.

Threads: lookups and saves are made by the model thread. Disk writes and
deletions run in one writer thread, in order; disk reads in one reader
thread, so neither blocks the model thread's steps nor the reactor. A
lock guards the disk tier's index, which the writer updates when a write
lands or fails. The memory tier is the model thread's alone.

Failures never stop serving: a file that cannot be written (full disk,
read-only directory) is logged and forgotten; a file that is corrupt,
truncated, from another model or another format is logged, counted
(L{CacheStats.rejected}) and removed, never loaded.

Covered by tests/unit/test_kvcache.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from . import _file
from ._index import Entry, Match, PrefixIndex, as_array, value

log = Logger()

#: ds4-server's C{--kv-cache-min-tokens} default: a shorter prefix
#: prefills in about as long as a restore takes, and would crowd the
#: budget with single-turn title requests.
DEFAULT_MIN_TOKENS = 512
#: A restore must win at least 1/RESTORE_WORTH of the state it loads
#: (restoring costs ~0.025 ms per token of state from memory, prefilling
#: ~4-20 ms per token on the demo model).
RESTORE_WORTH = 50

State = bytes | bytearray | memoryview


@dataclass
class CacheStats:
    """Monotonic counters, read by /metrics (any thread; ints only)."""

    #: Requests whose prefix came from: a retained slot, another slot, memory, disk.
    hits: Counter[str] = field(default_factory=Counter)
    misses: int = 0
    #: Prompt tokens restored, by tier.
    restored_tokens: Counter[str] = field(default_factory=Counter)
    #: States saved, and evicted, by tier.
    saves: Counter[str] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)
    #: Saves refused: the tier is full of entries that score higher.
    refused: Counter[str] = field(default_factory=Counter)
    #: Files rejected, by reason (L{_file.REASONS}).
    rejected: Counter[str] = field(default_factory=Counter)
    write_errors: int = 0


@dataclass
class _Pending:
    """A disk entry whose file is still being written (its state in memory)."""

    data: State


class Restore:
    """
    One planned restore: C{length} prompt tokens from C{entry}'s state.
    From memory it is ready at once; from disk the reader thread loads it
    (L{done}, L{wait}), and L{cancel} stops the read within a chunk.
    """

    def __init__(
        self,
        cache: PromptCache,
        tier: str,
        entry: Entry,
        length: int,
        data: State | None = None,
        future: Future[State | None] | None = None,
    ) -> None:
        self.cache = cache
        self.tier = tier
        self.entry = entry
        self.length = length
        self._data = data
        self._future = future
        self.cancelled = threading.Event()
        self._settled = False

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self, timeout: float) -> bool:
        if self._future is None:
            return True
        wait_futures([self._future], timeout)
        return self._future.done()

    def result(self) -> State | None:
        """The state, or None when it could not be loaded (logged)."""
        if self._future is not None:
            return self._future.result()
        return self._data

    def cancel(self) -> None:
        self.cancelled.set()
        self.settle(False)

    def settle(self, restored: bool) -> None:
        """The restore happened (or not): count it and let the entry go."""
        if self._settled:
            return
        self._settled = True
        self.cache._settled(self, restored)


@dataclass(frozen=True)
class Found:
    tier: str
    match: Match


class PromptCache:
    """
    @param ram_bytes: the memory tier's budget (0: no memory tier).
    @param disk_dir: the disk tier's directory (None: no disk tier).
    @param disk_bytes: the disk tier's budget.
    @param min_tokens: shorter prefixes are never saved.
    """

    def __init__(
        self,
        *,
        ram_bytes: int = 0,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_bytes: int = 0,
        min_tokens: int = DEFAULT_MIN_TOKENS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.min_tokens = max(1, min_tokens)
        self.clock = clock
        self.ram = PrefixIndex(max(0, ram_bytes), clock)
        self.disk = PrefixIndex(max(0, disk_bytes), clock)
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.stats = CacheStats()
        self.identity: dict[str, Any] = {}
        #: Entries longer than this cannot be restored (the context's size).
        self.max_tokens: int | None = None
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._lockfile: int | None = None
        self.disk_on = False

    @property
    def ram_on(self) -> bool:
        return self.ram.budget > 0

    @property
    def enabled(self) -> bool:
        return self.ram_on or self.disk_on

    # -- start and stop (model thread) ---------------------------------------

    def start(self, identity: Mapping[str, Any], max_tokens: int | None = None) -> None:
        """
        Pin the model's identity and scan the disk tier's directory: files
        that must not be loaded are removed, the rest indexed.
        """
        self.identity = dict(identity)
        self.max_tokens = max_tokens
        # Started again after a close (a model unloaded and loaded again):
        # the directory is the truth, scanned afresh below.
        with self._lock:
            self.disk.entries.clear()
        if self.disk_dir is None or self.disk.budget <= 0:
            return
        directory = self.disk_dir
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            log.warn(
                "ds4tw: prompt cache: cannot use {dir} ({error}); no disk cache",
                dir=str(directory),
                error=e.strerror or str(e),
            )
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.warn(
                "ds4tw: prompt cache: {dir} is in use by another ds4tw; no disk cache "
                "(give each server its own --kv-disk-dir)",
                dir=str(directory),
            )
            return
        self._lockfile = fd
        self.disk_on = True
        self._writer = ThreadPoolExecutor(1, "ds4tw-kv-write")
        self._reader = ThreadPoolExecutor(1, "ds4tw-kv-read")
        started = time.monotonic()
        for path in sorted(directory.iterdir()):
            if path.name.endswith(_file.TMP_SUFFIX):
                path.unlink(missing_ok=True)  # a write cut off by a crash
            elif path.suffix == _file.SUFFIX:
                self._index_file(path)
        # A smaller budget than last time: the lowest scores go.
        for gone in self.disk.overflow(0):
            self.disk.remove(gone)
            self.stats.evictions["disk"] += 1
            self._unlink(gone)
        log.info(
            "ds4tw: prompt cache: {n} prefixes ({mib:.0f} MiB of {budget:.0f}) on disk in {dir}, "
            "scanned in {s:.2f}s",
            n=len(self.disk),
            mib=self.disk.used_bytes / 2**20,
            budget=self.disk.budget / 2**20,
            dir=str(directory),
            s=time.monotonic() - started,
        )

    def _index_file(self, path: Path) -> None:
        try:
            head = _file.read_head(path, self.identity)
            used = path.stat().st_mtime
        except _file.Rejected as e:
            self._reject(path, e)
            return
        except OSError as e:
            log.warn("ds4tw: prompt cache: cannot read {path}: {error}", path=str(path), error=e)
            return
        self.disk.add(Entry(as_array(head.tokens), head.size, head.hits, used, head))

    def _reject(self, path: Path, e: _file.Rejected) -> None:
        self.stats.rejected[e.reason] += 1
        log.warn("ds4tw: prompt cache: removed {name}: {why}", name=path.name, why=str(e))
        self._remove(path)

    def close(self, retained: Iterable[tuple[Sequence[int], Callable[[], State]]] = ()) -> None:
        """
        At shutdown or when the model is unloaded: save what would be lost
        (the slots' prefixes and the memory tier) to disk, wait for every
        write to land, and empty the memory tier. L{start} may run again
        after it.
        """
        if self.disk_on:
            started = time.monotonic()
            before = self.stats.saves["disk"]
            for tokens, state in retained:
                self.save_disk(tokens, state)
            for e in list(self.ram):
                self.save_disk(e.tokens, e.payload, hits=e.hits, used=e.used)
            assert self._writer is not None and self._reader is not None
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._writer.shutdown(wait=True)
            saved = self.stats.saves["disk"] - before
            if saved:
                log.info(
                    "ds4tw: prompt cache: saved {n} prefixes to {dir} at shutdown in {s:.2f}s",
                    n=saved,
                    dir=str(self.disk_dir),
                    s=time.monotonic() - started,
                )
            self.disk_on = False
        if self._lockfile is not None:
            os.close(self._lockfile)
            self._lockfile = None
        self.ram.entries.clear()

    def usage(self) -> dict[str, tuple[int, int, int]]:
        """Entries, bytes and budget of each tier (any thread)."""
        ram = list(self.ram.entries)
        with self._lock:
            disk = list(self.disk.entries) if self.disk_on else []
        return {
            "ram": (len(ram), sum(e.size for e in ram), self.ram.budget),
            "disk": (len(disk), sum(e.size for e in disk), self.disk.budget if self.disk_on else 0),
        }

    # -- lookup and restore (model thread) -----------------------------------

    def _lookup(self, prompt: Sequence[int], limit: int) -> Found | None:
        """The longest saved prefix of C{prompt} (memory first on a tie)."""
        if not self.enabled:
            return None
        arr = as_array(prompt)
        best: Found | None = None
        if self.ram_on:
            m = self.ram.match(arr, limit, max_tokens=self.max_tokens)
            if m is not None:
                best = Found("ram", m)
        if self.disk_on:
            with self._lock:
                m = self.disk.match(arr, limit, max_tokens=self.max_tokens)
            if m is not None and (best is None or m.length > best.match.length):
                best = Found("disk", m)
        return best

    @staticmethod
    def _worth(found: Found, have: int) -> bool:
        """Is restoring C{found} worth it over the C{have} tokens a slot gives?"""
        gain = found.match.length - have
        return gain > 0 and gain * RESTORE_WORTH >= found.match.entry.n_tokens

    def _fetch(self, found: Found) -> Restore:
        entry = found.match.entry
        length = found.match.length
        if found.tier == "ram":
            entry.pinned += 1
            return Restore(self, "ram", entry, length, data=entry.payload)
        with self._lock:
            entry.pinned += 1
            payload = entry.payload
        if isinstance(payload, _Pending):
            return Restore(self, "disk", entry, length, data=payload.data)
        assert self._reader is not None
        restore = Restore(self, "disk", entry, length)
        restore._future = self._reader.submit(self._read, entry, payload, restore.cancelled)
        return restore

    def _read(self, entry: Entry, head: _file.Head, cancelled: threading.Event) -> State | None:
        """Reader thread: load a file's state, or reject the file."""
        try:
            data = _file.read_state(head, cancelled.is_set)
        except _file.Cancelled:
            return None
        except _file.Rejected as e:
            with self._lock:
                self.disk.remove(entry)
            self._reject(head.path, e)
            return None
        except OSError as e:
            log.warn("ds4tw: prompt cache: cannot read {p}: {error}", p=str(head.path), error=e)
            with self._lock:
                self.disk.remove(entry)
            return None
        with contextlib.suppress(OSError):
            os.utime(head.path)  # recency survives a restart
        return data

    def _settled(self, restore: Restore, restored: bool) -> None:
        entry = restore.entry
        if restore.tier == "ram":
            entry.pinned -= 1
            if restored:
                self.ram.touch(entry)
        else:
            with self._lock:
                entry.pinned -= 1
                if restored:
                    self.disk.touch(entry)
        if restored:
            self.stats.restored_tokens[restore.tier] += restore.length

    # -- saving (model thread) ------------------------------------------------

    def keep(self, tokens: Sequence[int], state: Callable[[], State]) -> None:
        """
        A slot holding C{tokens} is about to be given to another prompt:
        save its state in memory, if it is worth a place there (else, with
        no memory tier, on disk).
        """
        if len(tokens) < self.min_tokens:
            return
        if not self.ram_on:
            self.save_disk(tokens, state)
            return
        arr = as_array(tokens)
        if self.ram.covering(arr) is not None:
            return
        gone = [e for e in self.ram.superseded(arr) if not e.pinned]
        hits = max((e.hits for e in gone), default=0)
        estimate = self._estimate(arr)
        victims = self.ram.victims(estimate, 1.0 + hits, excluding=gone)
        if victims is None:
            self.stats.refused["ram"] += 1
            return
        data = self._take(state)
        if data is None:
            return
        for e in gone:
            self.ram.remove(e)
        entry = Entry(arr, len(data), hits, self.clock(), data)
        for e in [*victims, *self.ram.overflow(len(data), victims)]:
            self._evict_ram(e)
        self.ram.add(entry)
        self.stats.saves["ram"] += 1

    def _evict_ram(self, e: Entry) -> None:
        self.ram.remove(e)
        self.stats.evictions["ram"] += 1
        # Memory's evictions go to disk (where they score as they did).
        self.save_disk(e.tokens, e.payload, hits=e.hits, used=e.used)

    def computed(self, tokens: Sequence[int], fresh: int, state: Callable[[], State]) -> None:
        """
        A prompt was just prefilled, C{fresh} of its tokens computed: a
        long one goes to disk at once (a restart, or memory pressure, would
        otherwise lose minutes of prefill).
        """
        if fresh >= self.min_tokens:
            self.save_disk(tokens, state)

    def save_disk(
        self,
        tokens: Sequence[int] | Any,
        state: Callable[[], State] | State,
        *,
        hits: int = 0,
        used: float | None = None,
    ) -> None:
        if not self.disk_on or len(tokens) < self.min_tokens:
            return
        arr = as_array(tokens)
        now = self.clock()
        with self._lock:
            if self.disk.covering(arr) is not None:
                return
            # An earlier turn still being written goes too (the writer
            # removes its file when it lands); one being read stays.
            gone = [
                e
                for e in self.disk.superseded(arr)
                if not e.pinned or isinstance(e.payload, _Pending)
            ]
            hits = max([hits, *(e.hits for e in gone)])
            score = value(hits, 0.0 if used is None else now - used)
            victims = self.disk.victims(self._estimate(arr), score, excluding=gone)
            if victims is None:
                self.stats.refused["disk"] += 1
                return
        data = self._take(state)
        if data is None:
            return
        with self._lock:
            entry = Entry(arr, len(data) + 4096, hits, used or now, _Pending(data), pinned=1)
            leaving = [*gone, *victims]
            leaving += self.disk.overflow(entry.size, leaving)
            for e in leaving:
                self.disk.remove(e)
            self.stats.evictions["disk"] += len(leaving) - len(gone)
            self.disk.add(entry)
        assert self._writer is not None
        for e in leaving:
            self._unlink(e)
        self._writer.submit(self._write, entry, data)

    @staticmethod
    def _take(state: Callable[[], State] | State) -> State | None:
        """The state to save, or None (logged) if the engine could not give it."""
        try:
            data = state() if callable(state) else state
        except Exception as e:
            log.warn("ds4tw: prompt cache: cannot read a sequence's state: {error}", error=e)
            return None
        return data if len(data) else None

    def _estimate(self, tokens: Sequence[int] | Any) -> int:
        per_token = int(self.identity.get("kv_bytes_per_token", 0))
        return len(tokens) * per_token

    def _unlink(self, e: Entry) -> None:
        head = e.payload
        if isinstance(head, _file.Head) and self._writer is not None:
            self._writer.submit(self._remove, head.path)

    # -- the writer thread ------------------------------------------------------

    def _write(self, entry: Entry, data: State) -> None:
        assert self.disk_dir is not None
        try:
            head = _file.write(
                self.disk_dir,
                self.identity,
                [int(t) for t in entry.tokens],
                data,
                hits=entry.hits,
                created=self.clock(),
            )
        except OSError as e:
            self.stats.write_errors += 1
            log.warn(
                "ds4tw: prompt cache: cannot save a {n}-token prefix in {dir} ({error}); "
                "serving goes on without it",
                n=entry.n_tokens,
                dir=str(self.disk_dir),
                error=e.strerror or str(e),
            )
            with self._lock:
                self.disk.remove(entry)
            return
        with self._lock:
            entry.payload = head
            entry.size = head.size
            entry.pinned -= 1
            kept = entry in self.disk.entries
        if not kept:
            # Superseded or evicted while it was being written: the file
            # must not outlive its entry.
            self._remove(head.path)
            return
        self.stats.saves["disk"] += 1

    def _remove(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.warn("ds4tw: prompt cache: cannot remove {path}: {error}", path=str(path), error=e)
