"""`moe-probe publish RUN_DIR URL [--every S]`: copy a local run to a bucket, live or finished.

Runs are written locally (moe_probe.store.location); readers anywhere open the copy by its URL.
A copy tool that uploads files in any order can leave a reader of a *live* run with a group's
commit marker (its ``zarr.json``) newer than the chunks holding its rows: wrong numbers, not an
error. Each publish here therefore

1. reads every group's marker first (rows below it are complete on disk from then on),
2. lowers a remote marker first where the local one went down (a resume truncated the run),
3. uploads every other file that changed since this process last sent it,
4. uploads the markers read in 1, last.

A reader of the URL then never sees a marker ahead of the rows it covers: it reads the rows of
the previous publish or of this one. Uploads of one object are atomic on S3.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from moe_probe.run import CHECKPOINT, STORE
from moe_probe.store.location import RemotePath, as_path, is_url
from moe_probe.store.schema import GROUPS

__all__ = ["publish"]

_SKIP = (CHECKPOINT,)
"""Not published: readers never need the weights (``info`` then shows no checkpoint)."""


def publish(run_dir, url: str, *, storage_options: dict | None = None,
            sent: dict | None = None) -> dict:
    """Copy ``run_dir`` to ``url`` in the order above. ``sent``: what an earlier call returned
    (path -> (size, mtime_ns) as uploaded); files unchanged since are not sent again. Returns the
    new map. ValueError (one line) for a source that is not a local run or a target that is not
    a URL."""
    if is_url(run_dir):
        raise ValueError(f"publish {run_dir}: the run to publish must be a local directory")
    if not is_url(url):
        raise ValueError(f"publish to {url}: not a URL (e.g. s3://bucket/runs/name)")
    src, dest = Path(run_dir), as_path(url, storage_options)
    if not (src / STORE / "zarr.json").is_file():
        raise ValueError(f"publish {src}: not a moe_probe run (no {STORE})")
    sent = dict(sent or {})
    paths = {f"{STORE}/{g}/zarr.json": src / STORE / g / "zarr.json" for g in GROUPS}
    stats = {k: p.stat() for k, p in paths.items() if p.is_file()}
    markers = {k: paths[k].read_bytes() for k in stats}
    lowered = {k: v for k, v in markers.items() if _committed(v) < _remote_committed(dest / k)}
    _pipe(dest, lowered)
    todo = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src).as_posix()
        if not p.is_file() or rel in markers or rel in _SKIP or p.name.endswith(".partial"):
            continue
        st = p.stat()
        if sent.get(rel) != (st.st_size, st.st_mtime_ns):
            todo.append((rel, (st.st_size, st.st_mtime_ns)))
    if todo:
        _call(dest, dest.fs.put, [str(src / r) for r, _ in todo],
              [(dest / r).path for r, _ in todo])
    sent.update(todo)
    _pipe(dest, markers)  # sent every time: a few small files
    sent.update({k: (st.st_size, st.st_mtime_ns) for k, st in stats.items()})
    return sent


def _committed(meta: bytes) -> int:
    return int((json.loads(meta).get("attributes") or {}).get("committed_steps", 0))


def _remote_committed(path: RemotePath) -> int:
    try:
        return _committed(path.read_text().encode())
    except FileNotFoundError:
        return 0


def _pipe(dest: RemotePath, files: dict) -> None:
    if files:
        _call(dest, dest.fs.pipe, {(dest / k).path: v for k, v in files.items()})


def _call(dest: RemotePath, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - botocore, aiohttp and OSError share no base
        msg = str(e).strip().splitlines()
        raise ValueError(f"cannot publish to {dest}: {type(e).__name__}: "
                         f"{msg[0] if msg else ''}") from None


def command(args) -> int:
    """The CLI: publish once, or every ``--every`` seconds until interrupted."""
    if args.every is not None and not args.every > 0:
        raise ValueError(f"--every must be > 0 seconds, got {args.every}")
    sent = None
    while True:
        t0 = time.monotonic()
        before = dict(sent or {})
        sent = publish(args.run_dir, args.url, sent=sent)
        n = sum(1 for k, v in sent.items() if before.get(k) != v)
        print(f"published {args.run_dir} to {args.url}: {n} changed file(s) sent "
              f"in {time.monotonic() - t0:.1f} s", flush=True)
        if args.every is None:
            return 0
        time.sleep(max(0.0, args.every - (time.monotonic() - t0)))

