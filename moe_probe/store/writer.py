"""Append-only writer of ``RUN_DIR/traces.zarr`` (zarr v3) with a commit marker per group.

The training loop only hands small CPU numpy rows to a queue (:meth:`StoreWriter.append`); a
background thread batches them and writes. Crash safety rests on three facts:

* zarr's ``LocalStore`` writes every chunk and ``zarr.json`` to a temp file and renames it, so a
  SIGKILL leaves each file either old or new, never torn (a stray ``*.partial`` may remain;
  :meth:`StoreWriter.resume` removes them);
* per group, rows are written data first, then the ``step`` coordinate, then the group's
  ``committed_steps`` attribute, so every row below the marker is complete;
* arrays are grown a chunk at a time ahead of the marker, so readers slice ``[:committed_steps]``
  and never see rows past it.

Rollups (:mod:`moe_probe.store.rollup`) are folded from the rows the thread has just committed and
written under the same rules, each level behind the rows.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import zarr

from moe_probe.modalities import GRAD_COMPONENTS, LOSS_TERMS, MODALITIES
from moe_probe.store.layout import create_group, root_attrs
from moe_probe.store.rollup import (
    GroupRollup, create_levels, level_chunks, rows_reader, shrink,
)
from moe_probe.store.schema import (
    CHUNK_STEPS, GROUPS, LABEL_DIMS, ROLLUP_GROUPS, StoreError, required, row_shape,
)

__all__ = ["StoreWriter", "StoreWriteError"]


class StoreWriteError(RuntimeError):
    """The background writer failed; raised on the next append/flush/close."""


_DEFAULT_LABELS = {"modality": MODALITIES, "term": LOSS_TERMS, "component": GRAD_COMPONENTS}

_LIVE: "weakref.WeakSet[StoreWriter]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # daemon thread + atexit: pending rows are still written on normal exit
    for w in list(_LIVE):
        try:
            w.close()
        except Exception:  # noqa: BLE001 - at exit there is no caller left to tell
            pass


class StoreWriter:
    """Use :meth:`create` or :meth:`resume`, then ``append``/``append_rows``, ``flush``, ``close``
    (or ``with``). Not thread-safe for concurrent appends: one producer (the training loop)."""

    def __init__(self, path: Path, root: zarr.Group, *, linger: float = 2.0, max_rows: int = 4096,
                 queue_size: int = 4096):
        self.path = path
        self._root = root
        self._linger = linger
        self._max_rows = max_rows
        self._groups: dict[str, zarr.Group] = {}
        self._arrays: dict[str, dict[str, zarr.Array]] = {}
        self._rows: dict[str, dict[str, tuple[int, ...]]] = {}
        self._labels: dict[str, dict[str, list[str]]] = {}
        self._n: dict[str, int] = {}          # rows committed (thread side)
        self._last: dict[str, int | None] = {}  # last step handed over (caller side)
        for g in GROUPS:
            if g not in root:
                continue
            grp = root[g]
            self._groups[g] = grp
            present = set(grp.array_keys())
            self._labels[g] = {d: [str(x) for x in grp[d][:]] for d in LABEL_DIMS[g] if d in present}
            sizes = {d: len(v) for d, v in self._labels[g].items()}
            # Only the arrays this store has: a store written before an optional array existed
            # goes on without it (its readers say "not measured" for the whole run).
            self._arrays[g] = {name: grp[name] for name in GROUPS[g] if name in present}
            self._arrays[g]["step"] = grp["step"]
            self._rows[g] = {name: row_shape(g, name, sizes) for name in self._arrays[g]
                             if name != "step"}
            n = int(grp.attrs.get("committed_steps", 0))
            self._n[g] = n
            self._last[g] = int(grp["step"][n - 1]) if n else None
        self._rollups: dict[str, GroupRollup] = {}
        self._open_rollups(dict(root.attrs))
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self.stats = {"writes": 0, "rows": 0, "write_seconds": 0.0, "close_seconds": 0.0,
                      "rollup_seconds": 0.0, "rollup_close_seconds": 0.0}
        """Writer-thread totals (benchmarks/bench_writer.py reads them); ``close_seconds``: the
        part of ``write_seconds`` spent on close (the last rows, the finest level's last
        windows); ``rollup_seconds``: the part spent on rollups (folding rows in, writing
        levels), ``rollup_close_seconds`` its part on close."""
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"moe_probe-writer:{path}",
                                        daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path, *, attrs: dict, coords: dict[str, dict[str, list] | None],
               chunk_steps: dict[str, int] | None = None, rollups: bool | dict = True,
               **kw) -> "StoreWriter":
        """Create the store at ``path`` (a new directory; an existing one is an error). A run's
        store lives where :class:`moe_probe.run.Run` says (``Run(dir).store_path``).

        ``attrs``: root attributes, at least ``run`` and ``model`` (``schema_version`` and
        ``modalities`` are added). ``coords``: group -> {dim: labels}; groups left out (or None)
        are absent from the store. ``modality``, ``term``, ``component`` default to the lists in
        :mod:`moe_probe.modalities`, ``expert2`` to ``expert``. ``rollups``: lay out and write
        the rollup levels of :data:`~moe_probe.store.schema.ROLLUP_GROUPS` (off: the rows only, as
        a 1.1 writer did; ``moe-probe rollup`` adds them later); a dict {factor: windows per
        chunk} chunks them other than :data:`~moe_probe.store.schema.ROLLUP_CHUNKS` (a level is
        written a chunk at a time: tests use small ones to see every level on a short run).
        """
        path = Path(path)
        if path.exists():
            raise StoreError(f"a store already exists at {path} (use resume, or remove it)")
        if isinstance(rollups, dict):
            level_chunks(rollups)  # checked before anything is written
        unknown = set(coords) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown store group(s) {sorted(unknown)}; known: {list(GROUPS)}")
        steps = {**CHUNK_STEPS, **(chunk_steps or {})}
        attrs_out = root_attrs(attrs)
        layout = {}  # validate everything before anything is written
        for g, labels in coords.items():
            if labels is None:
                continue
            labels = dict(labels)
            for d, default in _DEFAULT_LABELS.items():
                if d in LABEL_DIMS[g]:
                    labels.setdefault(d, list(default))
            if "expert2" in LABEL_DIMS[g] and "expert" in labels:
                labels.setdefault("expert2", list(labels["expert"]))
            missing = [d for d in LABEL_DIMS[g] if d not in labels]
            extra = [d for d in labels if d not in LABEL_DIMS[g]]
            if missing or extra:
                raise ValueError(f"coords for group {g!r}: need dims {list(LABEL_DIMS[g])}, "
                                 f"missing {missing}, unexpected {extra}")
            for d in LABEL_DIMS[g]:
                vals = [str(x) for x in labels[d]]
                if len(set(vals)) != len(vals):
                    raise ValueError(f"coords for {g}/{d} has duplicate labels: {vals}")
                labels[d] = vals
            layout[g] = labels
        root = zarr.open_group(str(path), mode="w-", zarr_format=3)
        for g, labels in layout.items():
            create_group(root, g, labels, steps[g])
            if rollups is not False and g in ROLLUP_GROUPS:
                create_levels(root, g, labels, list(GROUPS[g]),
                              rollups if isinstance(rollups, dict) else None)
        # Root attrs last: a store that has schema_version is fully laid out.
        root.attrs.update(attrs_out)
        return cls(path, zarr.open_group(str(path), mode="r+"), **kw)

    @classmethod
    def resume(cls, path, *, after_step: int | None = None, **kw):
        """Reopen a store for appending. Returns ``(writer, committed)`` with ``committed`` =
        {group: committed rows}. Rows past each marker (a crash mid-append) are truncated; with
        ``after_step``, committed rows of later steps are dropped too (resuming from a checkpoint
        taken at ``after_step``). The next append of a group must have a step above
        ``writer.last_step(group)``."""
        from moe_probe.store.reader import RunStore  # validates version / foreign stores

        store = RunStore(path)
        path = store.store_path
        for p in path.rglob("*.partial"):  # temp files of writes a SIGKILL interrupted
            p.unlink(missing_ok=True)
        root = zarr.open_group(str(path), mode="r+")
        committed = {}
        for g in store.groups:
            grp = root[g]
            n = int(grp.attrs.get("committed_steps", 0))
            if after_step is not None and n:
                steps = grp["step"][:n]
                n = int(np.searchsorted(steps, after_step, side="right"))
            # Marker first: if we die between the two, the marker is still <= every array length.
            grp.attrs["committed_steps"] = n
            for name in [*GROUPS[g], "step"]:
                if name in grp:
                    arr = grp[name]
                    arr.resize((n, *arr.shape[1:]))
            committed[g] = n
        writer = cls(path, root, **kw)
        writer._catch_up()  # before any append: the thread has nothing to do yet
        return writer, committed

    # ------------------------------------------------------------------ producer side
    @property
    def groups(self) -> list[str]:
        return list(self._groups)

    def set_attrs(self, attrs: dict) -> None:
        """Replace root attrs (a run started over in place) as :meth:`create` sets them."""
        self._root.attrs.update(root_attrs(attrs))
        self._open_rollups(dict(self._root.attrs))  # the expert groups may have changed

    def labels(self, group: str, dim: str) -> list[str]:
        """Labels the store holds for ``group``'s ``dim`` (e.g. the eval ``metric`` columns)."""
        self._check_group(group)
        if dim not in LABEL_DIMS[group]:
            raise ValueError(f"group {group!r} has no labelled dim {dim!r} "
                             f"(has {list(LABEL_DIMS[group])})")
        return list(self._labels[group][dim])

    def last_step(self, group: str) -> int | None:
        """Last step handed over for ``group`` (None if none)."""
        self._check_group(group)
        return self._last[group]

    def append(self, group: str, step: int, **arrays) -> None:
        """One row of ``group`` at ``step``: every array of the group, without the step dim."""
        rows = {}
        self._check(group, arrays)
        for name, value in arrays.items():
            if name not in self._rows[group]:
                continue  # an optional array this (older) store does not have
            a = np.asarray(value)
            want = self._rows[group][name]
            if a.shape != want:
                raise ValueError(f"{group}/{name}: row shape {a.shape}, expected {want} "
                                 f"(dims {GROUPS[group][name].dims})")
            rows[name] = _cast(group, name, a)[None]  # a copy: the caller may reuse its buffer
        self._put(group, np.array([int(step)], dtype=np.int64), rows)

    def append_rows(self, group: str, steps, **arrays) -> None:
        """Many rows at once (fixtures, scans): arrays carry a leading step dim."""
        self._check(group, arrays)
        steps = np.asarray(steps, dtype=np.int64).reshape(-1)
        if steps.size > 1 and not np.all(np.diff(steps) > 0):
            raise ValueError(f"{group}: steps must be strictly increasing")
        rows = {}
        for name, value in arrays.items():
            if name not in self._rows[group]:
                continue  # an optional array this (older) store does not have
            a = np.asarray(value)
            want = (steps.size, *self._rows[group][name])
            if a.shape != want:
                raise ValueError(f"{group}/{name}: shape {a.shape}, expected {want}")
            rows[name] = _cast(group, name, a)
        if steps.size:
            self._put(group, steps, rows)

    def flush(self) -> None:
        """Block until every handed row is written and committed."""
        self._raise_if_failed()
        if self._closed:
            return
        done = threading.Event()
        self._q.put(("flush", done))
        while not done.wait(0.1):
            if not self._thread.is_alive():
                break
        self._raise_if_failed()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._thread.is_alive():
                self._q.put(("stop", None))
                self._thread.join()
            _LIVE.discard(self)
            if self._error is None:
                self._trim()
        self._raise_if_failed()

    def _open_rollups(self, attrs: dict) -> None:
        self._rollups = {g: r for g in self._groups
                         if (r := GroupRollup.open(self._root, g, attrs)) is not None}

    def _catch_up(self) -> None:
        """Cut the rollups to the committed rows and fold in what they lack (a resume)."""
        for g, ru in self._rollups.items():
            ru.catch_up(self._n[g], rows_reader(self._arrays[g]))

    def _trim(self) -> None:
        """Cut the chunk-sized growth back to the committed rows on a clean close, so a finished
        store read with plain ``xr.open_zarr`` shows exactly its rows (no fill-value tail).
        Arrays stay >= the marker throughout, so a concurrent reader is never misled."""
        try:
            for g, arrays in self._arrays.items():
                shrink(arrays.values(), self._n[g])
            for ru in self._rollups.values():
                ru.trim()
        except BaseException as e:  # noqa: BLE001 - surfaced like any other write failure
            self._error = e

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.close()
        except StoreWriteError:
            if exc is None:
                raise  # don't mask the caller's exception with ours

    def _check_group(self, group):
        if group not in self._groups:
            raise ValueError(f"store group {group!r} is not in this store "
                             f"(present: {list(self._groups)})")

    def _check(self, group, arrays):
        self._raise_if_failed()
        if self._closed:
            raise ValueError("append to a closed StoreWriter")
        self._check_group(group)
        need, known, got = set(required(group)), set(GROUPS[group]), set(arrays)
        if not need <= got <= known:
            raise ValueError(f"{group}: arrays {sorted(got)} given; required {sorted(need)}, "
                             f"optional {sorted(known - need)} (missing {sorted(need - got)}, "
                             f"unexpected {sorted(got - known)})")

    def _put(self, group, steps, rows):
        last = self._last[group]
        if last is not None and steps[0] <= last:
            raise ValueError(f"{group}: step {int(steps[0])} is not after the last step {last} "
                             "(steps must be strictly increasing per group)")
        self._last[group] = int(steps[-1])
        while True:
            try:
                self._q.put(("rows", (group, steps, rows)), timeout=1.0)
                return
            except queue.Full:  # back-pressure; a dead thread would block forever
                self._raise_if_failed()

    def _raise_if_failed(self):
        if self._error is not None:
            raise StoreWriteError(f"trace writer for {self.path} failed: "
                                  f"{type(self._error).__name__}: {self._error}") from self._error

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        stop = False
        while not stop:
            kind, payload = self._q.get()
            deadline = time.monotonic() + self._linger
            pending: dict[str, list] = {}
            events = []
            n_rows = 0
            while True:
                if kind == "rows":
                    pending.setdefault(payload[0], []).append(payload)
                    n_rows += len(payload[1])
                elif kind == "flush":
                    events.append(payload)
                elif kind == "stop":
                    stop = True
                if stop or events or n_rows >= self._max_rows:
                    break
                # linger from the batch's first row: fewer, larger writes rewrite the tail chunk
                # less often, and a steady producer still gets a commit every `linger` seconds
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                try:
                    kind, payload = self._q.get(timeout=wait)
                except queue.Empty:
                    break
            if self._error is None and (pending or events or stop):
                t0, r0 = time.perf_counter(), self.stats["rollup_seconds"]
                try:
                    for g, items in pending.items():
                        self._write(g, items)
                    t1 = time.perf_counter()
                    for ru in self._rollups.values():
                        ru.write(last=stop)
                    self.stats["rollup_seconds"] += time.perf_counter() - t1
                    if stop:  # the last rows' fold and the levels' last write
                        self.stats["rollup_close_seconds"] = self.stats["rollup_seconds"] - r0
                    if pending:
                        self.stats["writes"] += 1
                        self.stats["rows"] += n_rows
                    self.stats["write_seconds"] += time.perf_counter() - t0
                    if stop:
                        self.stats["close_seconds"] = time.perf_counter() - t0
                except BaseException as e:  # noqa: BLE001 - surfaced on the producer side
                    self._error = e
            for ev in events:
                ev.set()

    def _write(self, g: str, items: list) -> None:
        steps = np.concatenate([it[1] for it in items])
        n0 = self._n[g]
        n1 = n0 + steps.size
        arrays = self._arrays[g]
        chunk = arrays["step"].chunks[0]
        if arrays["step"].shape[0] < n1:
            cap = -(-n1 // chunk) * chunk
            for a in arrays.values():
                a.resize((cap, *a.shape[1:]))
        rows = {}
        for name, arr in arrays.items():
            if name == "step":
                continue
            # An optional array a producer did not give for some rows: fill value (NaN) there.
            parts = [it[2][name] if name in it[2] else
                     np.full((it[1].size, *arr.shape[1:]), arr.fill_value, arr.dtype)
                     for it in items]
            rows[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
            arr[n0:n1] = rows[name]
        arrays["step"][n0:n1] = steps
        self._groups[g].attrs["committed_steps"] = n1  # the commit: strictly after the data
        self._n[g] = n1
        if g in self._rollups:
            t0 = time.perf_counter()
            self._rollups[g].add(steps, rows)
            self.stats["rollup_seconds"] += time.perf_counter() - t0


def _cast(group: str, name: str, a: np.ndarray) -> np.ndarray:
    dtype = np.dtype(GROUPS[group][name].dtype)
    if dtype.kind == "i" and a.dtype.kind == "f" and not np.isfinite(a).all():
        # NaN cast to int32 is an arbitrary number: refuse rather than store a made-up count
        raise ValueError(f"{group}/{name} holds counts ({dtype}); got non-finite values")
    return a.astype(dtype)
