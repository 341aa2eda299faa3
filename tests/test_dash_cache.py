"""The dashboard's cache (dashboards/cache.py): single flight, failed builds not shared, versions,
LRU bounds; and the versions of store reads following a live run's commits."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from dashboards import cache as C
from dashboards import data

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stores"


class _Watched(C.Future):
    """A real Future that says when someone starts waiting on it."""
    waiting = threading.Event()

    def result(self, timeout=None):
        _Watched.waiting.set()
        return super().result(timeout)


def _second_caller_waits(monkeypatch, cache, key, builds):
    """Two threads ask for `key` at version 1; the first one's build (builds[0]) runs until the
    second is waiting on it. Returns what each thread got (a value or the exception)."""
    monkeypatch.setattr(C, "Future", _Watched)
    _Watched.waiting.clear()
    started, out = threading.Event(), {}
    calls = iter(builds)

    def build():
        started.set()
        assert _Watched.waiting.wait(10), "the second caller did not wait for the first build"
        return next(calls)()

    def ask(name):
        try:
            out[name] = cache.get(key, 1, build)
        except RuntimeError as e:
            out[name] = e

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=ask, args=("second",))
    second.start()
    for t in (first, second):
        t.join(10)
    return out


def test_a_key_asked_for_twice_at_once_is_built_once(monkeypatch):
    cache = C.Cache("t", entries=4)
    built = []
    out = _second_caller_waits(monkeypatch, cache, "k", [lambda: built.append(1) or ["value"]])
    assert built == [1] and out["first"] is out["second"] == ["value"]
    assert cache.get("k", 1, lambda: pytest.fail("rebuilt")) is out["first"]


def test_a_failed_build_is_not_shared_the_waiter_asks_again(monkeypatch):
    cache = C.Cache("t", entries=4)

    def fail():
        raise RuntimeError("first build failed")

    out = _second_caller_waits(monkeypatch, cache, "k", [fail, lambda: "second build"])
    assert isinstance(out["first"], RuntimeError)  # raised in its own caller only
    assert out["second"] == "second build"  # the waiter built for itself
    assert cache.get("k", 1, lambda: pytest.fail("rebuilt")) == "second build"


def test_a_new_version_replaces_the_entry():
    cache = C.Cache("t", entries=4)
    assert cache.get("k", 1, lambda: "v1") == "v1"
    assert cache.get("k", 1, lambda: "rebuilt") == "v1"  # same version: a hit
    assert cache.get("k", 2, lambda: "v2") == "v2"  # new rows: built again
    assert len(cache) == 1 and cache.peek("k").version == 2  # the old version is gone
    assert cache.get("k", 2, lambda: "rebuilt") == "v2"


def test_the_cache_is_bounded_by_entries_and_bytes():
    cache = C.Cache("t", entries=2)
    cache.get("a", 0, lambda: "a")
    cache.get("b", 0, lambda: "b")
    cache.get("a", 0, lambda: pytest.fail("a was evicted"))  # touch a: b is now the oldest
    cache.get("c", 0, lambda: "c")
    assert len(cache) == 2 and cache.peek("b") is None and cache.peek("a") is not None
    small = C.Cache("t", entries=10, max_bytes=10)
    for k in "xyz":
        small.get(k, 0, lambda: np.zeros(6, np.uint8), size=lambda v: v.nbytes)
    assert len(small) == 1 and small.peek("z") is not None  # 6 + 6 bytes > 10


def test_submit_builds_in_the_background_once():
    cache = C.Cache("t", entries=4)
    go = threading.Event()
    fut = cache.submit("k", 1, lambda: go.wait(10) and "done")
    assert cache.in_flight("k") is fut and cache.submit("k", 1, lambda: "other") is fut
    go.set()
    assert fut.result(10) == "done"
    assert cache.in_flight("k") is None and cache.submit("k", 1, lambda: "other").result() == "done"


def test_store_reads_follow_a_live_runs_commits(tmp_path):
    """A slice read, then rows committed by the writer: the next read is a miss and holds them
    (the commit marker is the version); rows past the marker are never read."""
    from moe_probe.run import store_path
    from moe_probe.store import StoreWriter

    shutil.copytree(FIXTURES / "live", tmp_path / "live")
    before = data.read_slice(tmp_path, "live", "routing", "capacity_rate", layer="0")
    assert data.read_slice(tmp_path, "live", "routing", "capacity_rate", layer="0") is before
    last = int(before.steps[-1])
    assert np.nanmax(before.values) < 2  # no garbage past the marker
    shape = data.group_dataset(tmp_path, "live", "routing").sizes
    L, M, E = shape["layer"], shape["modality"], shape["expert"]
    writer, _ = StoreWriter.resume(store_path(tmp_path / "live"))
    try:
        writer.append("routing", last + 1, tokens=np.full((L, M), 40, np.int32),
                      kept=np.full((L, M), 80.0, np.float32),
                      capacity_rate=np.full((L, M), 0.5, np.float32),
                      entropy=np.ones((L, M), np.float32), maxvio=np.zeros((L, M), np.float32),
                      dead_frac=np.zeros((L, M), np.float32),
                      confidence=np.full((L, M), 0.3, np.float32),
                      load=np.full((L, M, E), 10, np.int32), router_z=np.ones(L, np.float32))
        writer.flush()
    finally:
        writer.close()
    after = data.read_slice(tmp_path, "live", "routing", "capacity_rate", layer="0")
    assert int(after.steps[-1]) == last + 1 and list(after.values[-1]) == [0.5] * M
    np.testing.assert_array_equal(after.values[:-1], before.values)
