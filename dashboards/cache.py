"""The dashboard's one cache: a version-keyed LRU with single flight.

Every cached thing of the dashboard (opened datasets, data slices, figures, diagnoses, message
figures) lives in a `Cache`. An entry is stored under a key with a version, one version per key:
for store data the version is the committed row counts, so a live run's new rows make the next
read a miss and replace the entry (rows below a commit marker never change, so an unchanged
version is a valid hit). A value being built is built once: a second caller of the same key and
version waits for that build (a page's callback and the warmer asking for one view at once); a
failed build is raised in its own caller only, and each waiter then asks again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

_ALL: list["Cache"] = []


@dataclass(frozen=True, kw_only=True)
class Entry:
    """A cached value with the version it was built for."""
    version: Any
    """The version of its inputs it was built for (e.g. committed rows per group)."""
    value: Any
    """What the build returned."""
    nbytes: int
    """Its size as counted against the cache's byte budget."""
    made: float
    """time.monotonic() when it was stored."""

    def age_s(self) -> float:
        return time.monotonic() - self.made


class Cache:
    """LRU of at most `entries` keys and `max_bytes` bytes (as `size` of each value counts
    them); thread-safe."""

    def __init__(self, name: str, *, entries: int, max_bytes: int = 1 << 62):
        self.name, self.entries, self.max_bytes = name, entries, max_bytes
        self._d: OrderedDict[Any, Entry] = OrderedDict()
        self._flights: dict[Any, tuple[Any, Future]] = {}  # key -> (version, build under way)
        self._lock = threading.Lock()
        self._bytes = 0
        _ALL.append(self)

    def get(self, key, version, build: Callable[[], Any], *,
            size: Callable[[Any], int] | None = None):
        """The value of `key` at `version`: cached, or `build()` in this thread (once: other
        callers of the same key and version wait for it). `size(value)`: its bytes."""
        while True:
            hit, fut, mine = self._claim(key, version)
            if fut is None:
                return hit
            if mine:
                return self._run(key, version, fut, build, size)
            try:
                return fut.result()
            except BaseException:  # noqa: BLE001 - a failed build is not shared: ask again
                continue

    def submit(self, key, version, build: Callable[[], Any]) -> Future:
        """Like `get`, but a build runs in a daemon thread (a server stopped with Ctrl-C never
        waits for it); the Future holds the value (a failed build: its exception)."""
        hit, fut, mine = self._claim(key, version)
        if fut is None:
            done = Future()
            done.set_result(hit)
            return done
        if mine:
            def work():
                try:
                    self._run(key, version, fut, build, None)
                except BaseException:  # noqa: BLE001 - kept in the Future for the caller
                    pass
            threading.Thread(target=work, name=f"moe-probe-{self.name}", daemon=True).start()
        return fut

    def peek(self, key) -> Entry | None:
        """The entry of `key` whatever its version (a stale diagnosis is better than none)."""
        with self._lock:
            return self._d.get(key)

    def in_flight(self, key) -> Future | None:
        """The build of `key` under way, whatever its version."""
        with self._lock:
            flight = self._flights.get(key)
            return flight[1] if flight else None

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._d)

    def _claim(self, key, version):
        """(value, None, _) on a hit; else (None, future, mine): the build to wait for, or, if
        `mine`, the one this caller must run."""
        with self._lock:
            e = self._d.get(key)
            if e is not None and e.version == version:
                self._d.move_to_end(key)
                return e.value, None, False
            flight = self._flights.get(key)
            if flight is not None and flight[0] == version:
                return None, flight[1], False
            fut = Future()
            self._flights[key] = (version, fut)  # a build of another version goes on alone
            return None, fut, True

    def _run(self, key, version, fut: Future, build, size):
        try:
            value = build()
        except BaseException as e:
            self._land(key, fut)
            fut.set_exception(e)
            raise
        self._land(key, fut, Entry(version=version, value=value,
                                   nbytes=int(size(value)) if size else 0,
                                   made=time.monotonic()))
        fut.set_result(value)
        return value

    def _land(self, key, fut: Future, entry: Entry | None = None) -> None:
        with self._lock:
            if self._flights.get(key, (None, None))[1] is fut:
                del self._flights[key]
            if entry is None:
                return
            old = self._d.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._d[key] = entry
            self._bytes += entry.nbytes
            while self._d and (len(self._d) > self.entries or self._bytes > self.max_bytes):
                self._bytes -= self._d.popitem(last=False)[1].nbytes


def clear_all() -> None:
    """Forget every cached value, as a freshly started server has none (the benchmark's cold
    runs)."""
    for c in _ALL:
        c.clear()
