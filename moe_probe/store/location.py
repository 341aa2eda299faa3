"""Where a store is read from: a local path, or an fsspec URL such as ``s3://bucket/runs/x``.

The one owner of "is this a URL, and how is it opened". Remote stores are read-only: readers
(``open_run``, diagnosis, the dashboard) take a :class:`RemotePath` wherever they take a local
``Path``, and every writer asks :func:`local_path` first, which refuses a URL with one line.

Endpoint and credentials come from the filesystem's own settings: for S3 botocore's environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``…),
fsspec's (``FSSPEC_S3_ANON=true``, ``~/.config/fsspec/*.json``), or ``storage_options``.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from moe_probe.store.schema import StoreError

__all__ = ["RemotePath", "as_path", "is_url", "local_path", "zarr_store"]

_S3_DEFAULTS = {
    # A live run's listing changes under the reader: never answer from a cached one.
    "use_listings_cache": False,
    # botocore's defaults retry an unreachable endpoint for ~10 s with a 60 s connect timeout;
    # a reader should say "cannot reach" at once (one retry, for a dropped connection).
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 30,
                      "retries": {"mode": "standard", "max_attempts": 1}},
}
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs"}


def is_url(path) -> bool:
    """Whether ``path`` names a remote location (``file://`` URLs are local paths)."""
    if isinstance(path, RemotePath):
        return True
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def as_path(path, storage_options: dict | None = None) -> "Path | RemotePath":
    """A local ``Path``, or a :class:`RemotePath` for a URL (``storage_options`` go to fsspec)."""
    if isinstance(path, RemotePath):
        return path
    if is_url(path):
        return RemotePath.from_url(path, storage_options)
    if storage_options:
        raise ValueError(f"storage_options are for URLs; {path} is a local path")
    s = str(path)
    return Path(s[len("file://"):] if s.startswith("file://") else s)


def local_path(path, what: str = "--out") -> Path:
    """``path`` as a local Path; ValueError (one line) for a URL: moe_probe writes locally."""
    if is_url(path):
        raise ValueError(f"{what} {path}: moe_probe writes runs to local directories only; "
                         "write locally, then publish the run directory to the bucket "
                         "(README, 'Remote stores')")
    return as_path(path)


def zarr_store(path):
    """What ``zarr.open_group`` / ``open_array`` take for ``path``: the local path as a string
    (zarr's LocalStore, as before), or a read-only fsspec store."""
    return path.zarr_store() if isinstance(path, RemotePath) else str(path)


class RemotePath:
    """A file or directory on an fsspec filesystem, read-only, with the few ``pathlib`` methods
    readers use (``/``, ``parent``, ``name``, ``exists``, ``is_dir``, ``is_file``, ``read_text``,
    ``resolve``). Any failure but "not found" (endpoint unreachable, access denied, no
    credentials) is a one-line :class:`StoreError`."""

    def __init__(self, fs, path: str, url_options: dict):
        self.fs, self.path = fs, path.rstrip("/")
        self._options = url_options

    @classmethod
    def from_url(cls, url: str, storage_options: dict | None = None) -> "RemotePath":
        import fsspec
        from fsspec.config import conf

        protocol = url.split("://", 1)[0]
        # defaults < fsspec's own config (env vars, files) < what the caller passes
        defaults = _S3_DEFAULTS if protocol in ("s3", "s3a") else {}
        opts = {**{k: v for k, v in defaults.items() if k not in conf.get(protocol, {})},
                **(storage_options or {})}
        try:
            fs, path = fsspec.core.url_to_fs(url, **opts)
        except ImportError:
            pkg = _PACKAGES.get(protocol, f"the fsspec filesystem for {protocol}://")
            raise StoreError(f"reading {url} needs {pkg}: pip install 'moe_probe[remote]'"
                             if pkg == "s3fs" else f"reading {url} needs {pkg}") from None
        except (ValueError, TypeError) as e:
            raise StoreError(f"cannot open {url}: {_one_line(e)}") from None
        return cls(fs, path, opts)

    def __truediv__(self, name) -> "RemotePath":
        return RemotePath(self.fs, posixpath.join(self.path, str(name)), self._options)

    def __str__(self):
        return self.fs.unstrip_protocol(self.path)

    def __repr__(self):
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other):
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self):
        return hash(str(self))

    def __lt__(self, other: "RemotePath"):
        return self.path.split("/") < other.path.split("/")  # as pathlib sorts: by parts

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.fs, posixpath.dirname(self.path), self._options)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def resolve(self) -> "RemotePath":
        return self  # no symlinks or relative parts in an object store's keys

    def exists(self) -> bool:
        return self._call(self.fs.exists, self.path)

    def is_dir(self) -> bool:
        return self._call(self.fs.isdir, self.path)

    def is_file(self) -> bool:
        return self._call(self.fs.isfile, self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self._call(self.fs.cat_file, self.path).decode(encoding)

    def walk(self):
        """Like ``os.walk`` (top-down; prune by editing ``dirnames`` in place), yielding
        ``(RemotePath, dirnames, filenames)``."""
        todo = [self]
        while todo:
            here = todo.pop()
            entries = self._call(self.fs.ls, here.path, detail=True)
            dirs = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                          if e["type"] == "directory")
            files = sorted(posixpath.basename(e["name"]) for e in entries
                           if e["type"] != "directory")
            yield here, dirs, files
            todo += [here / d for d in reversed(dirs)]

    def zarr_store(self):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(str(self), storage_options=self._options, read_only=True)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore, aiohttp and OSError share no base
            raise StoreError(f"cannot read {self}: {_describe(e)}") from None


def _describe(e: Exception) -> str:
    msg = _one_line(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _one_line(e) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""
