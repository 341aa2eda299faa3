"""A run directory: its files, its creation, what it holds, and how it resumes.

The only module that knows the names of a run's files. Everything else (the trainer, ``info``,
``diagnose``, ``probe``, ``scan``, ``reproduce``, the dashboard, notebooks) asks a :class:`Run`.
Torch-free: readers use it too.

    RUN_DIR/
      traces.zarr/         the trace store (moe_probe.store)
      config.json          the training config (training runs only)
      run.json             summary: recipe, arch, n_params, groups, base, last eval, wall clock
      groups.json          the chosen expert groups (symbiotic / mot runs)
      checkpoint.pt        the last checkpoint (written by moe_probe.train.checkpoint)
      progress.json        the checkpoint's step, so nothing needs to load weights to know it
      reproduce_done.json  `moe-probe reproduce`'s mark of a finished run

Creation is atomic: every file of a new run is written into a hidden sibling directory that is
then renamed to RUN_DIR, so a run directory either holds a complete run (config, summary and an
empty, fully laid-out store) or does not exist. A SIGKILL during creation leaves only the hidden
directory, which the next creation removes.

Reading also takes a URL (``s3://bucket/runs/x``: moe_probe.store.location); writing is local only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from moe_probe.jsonutil import strict_json
from moe_probe.metrics import expert_group, layer_groups
from moe_probe.store.location import RemotePath, as_path, local_path
from moe_probe.store.reader import RunStore
from moe_probe.store.schema import StoreError
from moe_probe.store.writer import StoreWriter

__all__ = ["Run", "RunInfo", "open_run", "find_runs", "store_path", "config_diff"]

STORE = "traces.zarr"
CONFIG = "config.json"
SUMMARY = "run.json"
GROUPS = "groups.json"
CHECKPOINT = "checkpoint.pt"
PROGRESS = "progress.json"
DONE = "reproduce_done.json"
BASE_CACHE = ".base"
"""Stage-1 bases shared by the stage-2 runs of one parent directory (``$MOE_PROBE_CACHE``
overrides it: see moe_probe.train.stages)."""
_CREATING = ".creating-"


def store_path(run_dir) -> Path | RemotePath:
    return as_path(run_dir) / STORE


def open_run(path, *, storage_options: dict | None = None) -> RunStore:
    """The trace store of a run directory (or the store directory itself), for reading: a local
    path or an fsspec URL, e.g. ``s3://bucket/runs/x`` (``storage_options`` go to fsspec)."""
    p = as_path(path, storage_options)
    if not p.exists():
        raise StoreError(f"no such run directory: {p}")
    if p.is_dir() and not (p / "zarr.json").exists():
        if not (p / STORE).exists():
            raise StoreError(f"not a moe_probe run: {p} has no {STORE}")
        p = p / STORE
    return RunStore(p)


def find_runs(root) -> list[Path] | list[RemotePath]:
    """Run directories under ``root`` (``root`` itself included; a path or a URL) that hold a
    store."""
    root = as_path(root)
    if not root.is_dir():
        raise StoreError(f"no such directory: {root}")
    found = []
    for dirpath, dirnames, _ in (root.walk() if isinstance(root, RemotePath) else os.walk(root)):
        if STORE in dirnames:
            found.append(as_path(dirpath))
        # never descend into zarr stores (thousands of chunk dirs) or hidden dirs (bases, runs
        # being created)
        dirnames[:] = [d for d in dirnames if not d.endswith(".zarr") and not d.startswith(".")]
    return sorted(found)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (sorted)."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        name = f"{prefix}{k}"
        va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, name + ".")
        elif va != vb:
            out.append(name)
    return out


_MISSING = object()


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """What a run holds, parsed once from its store attrs and (training runs) its json files."""

    path: str
    name: str
    recipe: str | None
    seed: int | None
    stage: int | None
    """1 = a base, 2 = converted and trained with generation; None for runs moe_probe did not train."""
    arch: str | None
    n_params: int | None
    layers: list[str] = field(default_factory=list)
    """MoE layer names (the store's ``layer`` labels)."""
    experts: int | None = None
    """Routed experts per layer (MoT: both towers, E = 2·E_tower)."""
    top_k: int | None = None
    capacity_factor: float | None = None
    """None = dropless."""
    shared_experts: int | None = None
    groups: dict[str, dict[str, list[int]]] | None = None
    """Per layer, group name -> expert ids; None for ungrouped runs."""
    modality_group: dict[str, dict[str, str]] | None = None
    """Per layer, modality -> the group its tokens route into (where the store says)."""
    modalities: list[str] = field(default_factory=list)
    committed: dict[str, int] = field(default_factory=dict)
    """Committed rows per store group."""
    last_step: dict[str, int | None] = field(default_factory=dict)
    steps_done: int = 0
    """Steps behind the last checkpoint (training runs), else steps in the store."""
    steps_planned: int | None = None
    base: dict | None = None
    """The stage-1 base a stage-2 run started from: dir, key, eval."""
    eval: dict | None = None
    wall_s: float | None = None
    schema_version: str | None = None

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_attrs(cls, attrs: dict, *, path="", config: dict | None = None,
                   summary: dict | None = None, **fields) -> "RunInfo":
        """Parse a store's root attrs (plus, for training runs, the saved config and summary).
        The one reading of run metadata: ``Run.info``, diagnosis and the dashboard use it."""
        cfg, summary = config or {}, summary or {}
        model, run = _as_dict(attrs.get("model")), _as_dict(attrs.get("run"))
        mcfg, tcfg = cfg.get("model") or {}, cfg.get("train") or {}
        cf = model["capacity_factor"] if "capacity_factor" in model else mcfg.get("capacity_factor")
        mg = model.get("modality_group")
        return cls(
            path=str(path), name=str(run.get("name") or Path(str(path)).name),
            recipe=cfg.get("recipe", run.get("recipe")),
            seed=tcfg.get("seed", run.get("seed")), stage=tcfg.get("stage", run.get("stage")),
            arch=mcfg.get("arch", model.get("arch")),
            n_params=summary.get("n_params", model.get("n_params")),
            layers=[str(x) for x in model.get("layers") or range(mcfg.get("n_layers", 0))],
            experts=model.get("experts", mcfg.get("n_experts")),
            top_k=model.get("top_k", mcfg.get("top_k")), capacity_factor=cf,
            shared_experts=model.get("shared_experts", mcfg.get("n_shared")),
            groups=layer_groups(model.get("groups")),
            modality_group={str(k): dict(v) for k, v in mg.items() if isinstance(v, dict)}
            if isinstance(mg, dict) else None,
            modalities=list(attrs.get("modalities") or []),
            steps_planned=tcfg.get("steps"), base=summary.get("base"), eval=summary.get("eval"),
            wall_s=summary.get("wall_s"),
            schema_version=str(attrs["schema_version"]) if "schema_version" in attrs else None,
            **fields)

    def expert_group(self, layer: str, modality: str, n_experts: int) -> list[int]:
        """Expert ids the modality's tokens can route into at ``layer``
        (:func:`moe_probe.metrics.expert_group`)."""
        return expert_group(self.groups, self.modality_group, layer, modality, n_experts)


class Run:
    """One run directory. Cheap to make; nothing is read until asked. A URL can be read (``info``,
    ``store``), never written: creation refuses it with one line."""

    def __init__(self, path):
        self.path = as_path(path)

    def __repr__(self):
        return f"Run({str(self.path)!r})"

    # ------------------------------------------------------------------ files
    @property
    def store_path(self) -> Path:
        return self.path / STORE

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def progress_path(self) -> Path:
        return self.path / PROGRESS

    @property
    def done_path(self) -> Path:
        return self.path / DONE

    def has_store(self) -> bool:
        return self.store_path.exists()

    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.is_file()

    def has_config(self) -> bool:
        return (self.path / CONFIG).is_file()

    def exists(self) -> bool:
        """Whether RUN_DIR holds a run (a store, or a training config)."""
        return self.has_store() or self.has_config()

    def config(self) -> dict:
        """The saved training config as a dict; ValueError if this is not a training run."""
        if not self.has_config():
            raise ValueError(f"{self.path} is not a moe-probe training run (no {CONFIG})")
        return json.loads((self.path / CONFIG).read_text())

    def summary(self) -> dict:
        p = self.path / SUMMARY
        return json.loads(p.read_text()) if p.is_file() else {}

    def progress(self) -> int | None:
        """Steps done according to the last checkpoint's sidecar (None = no checkpoint yet)."""
        if not self.progress_path.is_file() or not self.has_checkpoint():
            return None
        return int(json.loads(self.progress_path.read_text())["step"])

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / SUMMARY, summary)

    def write_config(self, config: dict) -> None:
        write_json(self.path / CONFIG, config)

    def store(self) -> RunStore:
        return RunStore(self.store_path)

    # ------------------------------------------------------------------ what it holds
    def info(self) -> RunInfo:
        """Everything ``moe-probe info`` shows, read once. ValueError if RUN_DIR holds no run."""
        if not self.path.is_dir():
            raise ValueError(f"no run directory {self.path}")
        if not self.exists():
            raise ValueError(f"{self.path} is not a moe-probe run (no {CONFIG} or {STORE})")
        cfg = self.config() if self.has_config() else {}
        attrs, committed, last = {}, {}, {}
        if self.has_store():
            store = self.store()
            attrs = store.attrs
            committed = {g: store.committed_steps(g) for g in store.groups}
            last = {g: store.last_step(g) for g in store.groups}
        if cfg:
            steps_done = self.progress() or 0
        else:
            steps_done = max((s + 1 for s in last.values() if s is not None), default=0)
        return RunInfo.from_attrs(attrs, path=self.path, config=cfg, summary=self.summary(),
                                  committed=committed, last_step=last, steps_done=steps_done)

    # ------------------------------------------------------------------ creation
    def check_writable(self) -> None:
        """ValueError (one line) unless RUN_DIR can be a run directory: not a file, and its
        nearest existing ancestor a writable directory. Writes nothing that stays."""
        p = local_path(self.path)
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out {p} is a file, not a run directory")
        anc = p
        while not anc.exists():
            anc = anc.parent
        if not anc.is_dir():
            raise ValueError(f"--out {p}: {anc} is a file, so no directory can be made there")
        try:  # os.access says yes to root even on read-only mounts: try for real
            probe = tempfile.mkdtemp(prefix=".moe-probe-check-", dir=anc)
            os.rmdir(probe)
        except OSError as e:
            raise ValueError(f"--out {p}: cannot write in {anc} ({e.strerror})") from None

    def create(self, *, store_attrs: dict, store_coords: dict, config: dict | None = None,
               summary: dict | None = None, groups: dict | None = None) -> None:
        """Write a new run atomically: json files and an empty, fully laid-out store appear
        together under RUN_DIR, or not at all. RUN_DIR may exist only as an empty directory."""
        local_path(self.path)
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise ValueError(f"{self.path} already exists and is not empty")
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        # Not mkdtemp: its 0700 is for secrets; os.mkdir gives a run the umask's usual mode.
        tmp = parent / f".{self.path.name}{_CREATING}{os.getpid()}-{secrets.token_hex(4)}"
        os.mkdir(tmp)
        try:
            _fill(tmp, store_attrs, store_coords, config, summary, groups)
            if self.path.exists():
                self.path.rmdir()  # empty (checked above); rename cannot replace it otherwise
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def start_over(self, *, store_attrs: dict, store_coords: dict, config: dict | None = None,
                   summary: dict | None = None, groups: dict | None = None) -> None:
        """A run that died before its first checkpoint, started again in place: its files are
        rewritten and its store truncated to 0 rows (same layout: same config, so the same model).
        ValueError if the store's layout differs from the one the config now gives."""
        assert not self.has_checkpoint(), "a checkpointed run resumes; it never starts over"
        if not self.has_store():
            raise ValueError(f"{self.path} has a config but no {STORE}; remove it to start over")
        differs = self.layout_differences(store_coords)
        if differs:
            raise ValueError(f"{self.path}: the stored trace layout differs from this config's "
                             f"(groups {', '.join(differs)}); remove it to start over")
        writer, _ = StoreWriter.resume(self.store_path, after_step=-1)
        try:
            writer.set_attrs(store_attrs)
        finally:
            writer.close()
        _write_files(self.path, config, summary, groups)

    def layout_differences(self, store_coords: dict) -> list[str]:
        """Groups whose stored labels differ from ``store_coords`` (or that only one side has);
        read-only, so a refusal leaves every file as it was."""
        old = self.store()
        want = {g: c for g, c in store_coords.items() if c is not None}
        return sorted(set(want) ^ set(old.groups)) + [
            g for g in want if g in old.groups and any(
                old.labels(g, d) != [str(x) for x in v] for d, v in want[g].items())]

    def _remove_leftovers(self) -> None:
        """Hidden directories of creations a SIGKILL interrupted."""
        for p in self.path.parent.glob(f".{self.path.name}{_CREATING}*"):
            shutil.rmtree(p, ignore_errors=True)


def _fill(tmp: Path, store_attrs, store_coords, config, summary, groups) -> None:
    _write_files(tmp, config, summary, groups)
    StoreWriter.create(tmp / STORE, attrs=store_attrs, coords=store_coords).close()


def _write_files(run_dir: Path, config, summary, groups) -> None:
    if config is not None:
        write_json(run_dir / CONFIG, config)
    if summary is not None:
        write_json(run_dir / SUMMARY, summary)
    if groups is not None:
        write_json(run_dir / GROUPS, groups)


def write_json(path: Path, obj) -> None:
    """Atomic (temp file + rename): a reader or a crash sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _as_dict(v) -> dict:
    """An attrs entry as a dict (1.0 training runs stored ``run.config`` as a JSON string)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            return {}
    return dict(v) if isinstance(v, dict) else {}
