"""Remote stores: runs read from a real S3-compatible server on loopback (moto's standalone server,
fixtures/s3server.py) through s3fs, against the same runs read from disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import moe_probe
from moe_probe.diagnose.rundata import load_run
from moe_probe.diagnose.runner import diagnose
from moe_probe.run import Run, find_runs

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures" / "stores"
RUNS = ("healthy", "collapse", "grad_conflict", "live")
BUCKET = "s3://moe/runs"

for _mod in ("s3fs", "moto"):  # the test extra has both; CI must run these tests
    if os.environ.get("CI"):
        __import__(_mod)
    else:
        pytest.importorskip(_mod)

from fixtures.s3server import S3Server, free_port  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    with S3Server() as srv:
        for name in RUNS:
            srv.put(FIXTURES / name, f"{BUCKET}/{name}")
        yield srv


def _url(name: str) -> str:
    return f"{BUCKET}/{name}"


def _cli(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "moe_probe", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def _same_run(remote: dict, local: dict, url: str, path: Path) -> None:
    """A report of the remote run equals the local one once the run's location is named alike."""
    assert json.loads(json.dumps(remote).replace(url, str(path))) == local


@pytest.mark.parametrize("name", ["healthy", "live"])
def test_open_run_reads_the_same_rows_as_the_local_run(s3, name):
    remote, local = moe_probe.open_run(_url(name)), moe_probe.open_run(FIXTURES / name)
    assert str(remote.path) == _url(name) and remote.groups == local.groups
    assert remote.attrs == local.attrs
    for g in local.groups:
        assert remote.committed_steps(g) == local.committed_steps(g) > 0
        assert remote.last_step(g) == local.last_step(g)
        r, l = remote.dataset(g).load(), local.dataset(g).load()
        assert r.identical(l), g  # the live run too: only its committed rows, on both sides
    assert remote.labels("routing", "modality") == local.labels("routing", "modality")
    assert remote.frame("routing", "capacity_rate", layer="1").equals(
        local.frame("routing", "capacity_rate", layer="1"))
    # the store directory itself opens too, as a local one does
    assert moe_probe.open_run(_url(name) + "/traces.zarr").groups == local.groups


def test_storage_options_instead_of_the_environment(s3, monkeypatch):
    for k in s3.env:
        monkeypatch.delenv(k)
    opts = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    store = moe_probe.open_run(_url("healthy"), storage_options=opts)
    np.testing.assert_array_equal(store.read("routing", "load").values,
                                  moe_probe.open_run(FIXTURES / "healthy").read("routing",
                                                                                "load").values)
    with pytest.raises(ValueError, match="storage_options are for URLs"):
        moe_probe.open_run(FIXTURES / "healthy", storage_options=opts)


def test_find_runs_and_info_of_a_bucket(s3):
    assert [str(p) for p in find_runs("s3://moe")] == [_url(n) for n in sorted(RUNS)]
    remote = Run(_url("collapse")).info().as_dict()
    local = Run(FIXTURES / "collapse").info().as_dict()
    assert (remote.pop("path"), local.pop("path")) == (_url("collapse"), str(FIXTURES / "collapse"))
    assert remote == local
    r = _cli("info", _url("collapse"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["committed"] == local["committed"]


@pytest.mark.parametrize("name", ["collapse", "grad_conflict"])
def test_remote_diagnosis_equals_local_diagnosis(s3, name):
    remote = json.loads(diagnose([load_run(_url(name))]).to_json())
    local = json.loads(diagnose([load_run(str(FIXTURES / name))]).to_json())
    _same_run(remote, local, _url(name), FIXTURES / name)
    assert local["findings"], "the fixture plants findings: an empty report proves nothing"


def test_diagnose_cli_of_a_remote_run_equals_local(s3, tmp_path):
    url, path = _url("collapse"), FIXTURES / "collapse"
    r = _cli("diagnose", url, "--json", tmp_path / "r.json", "--fail-on", "collapse")
    l = _cli("diagnose", path, "--json", tmp_path / "l.json", "--fail-on", "collapse")
    assert r.returncode == l.returncode == 1, r.stderr
    assert r.stdout.replace(url, str(path)) == l.stdout
    _same_run(json.loads((tmp_path / "r.json").read_text()),
              json.loads((tmp_path / "l.json").read_text()), url, path)


def test_plain_xarray_opens_a_remote_store(s3):
    """As README shows: xarray alone (no moe_probe), storage options naming the endpoint."""
    opts = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    tree = xr.open_datatree(_url("healthy") + "/traces.zarr", engine="zarr", consolidated=False,
                            storage_options=opts)
    local = xr.open_datatree(FIXTURES / "healthy" / "traces.zarr", engine="zarr",
                             consolidated=False)
    assert tree.attrs == local.attrs
    for g in ("routing", "loss", "grad"):
        assert tree[g].to_dataset().load().identical(local[g].to_dataset().load()), g


def _unreachable() -> dict:
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there


BAD = {
    "unreachable": (_url("healthy"), _unreachable, "cannot read s3://moe/runs/healthy: "
                                                   "EndpointConnectionError"),
    "no_bucket": ("s3://no-such-bucket/runs/healthy", dict,
                  "no such run directory: s3://no-such-bucket/runs/healthy"),
    "no_run": (_url("missing"), dict, "no such run directory: s3://moe/runs/missing"),
    "not_a_run": ("s3://moe/runs", dict, "not a moe_probe run: s3://moe/runs has no traces.zarr"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_url_is_one_line_value_error(s3, case):
    url, env, msg = BAD[case]
    # this process's s3fs instance is cached with the live endpoint: name the dead one explicitly
    endpoint = env().get("AWS_ENDPOINT_URL")
    with pytest.raises(ValueError) as e:
        moe_probe.open_run(url, storage_options={"endpoint_url": endpoint} if endpoint else None)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_url_on_the_cli_is_exit_2_one_line(s3, case):
    url, env, msg = BAD[case]
    r = _cli("diagnose", url, env=env())
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"moe-probe diagnose: error: {msg}")


@pytest.mark.parametrize("root, env, msg", [
    ("s3://no-such-bucket/runs", dict, "dashboard root s3://no-such-bucket/runs does not exist"),
    (BUCKET, _unreachable, "cannot read s3://moe/runs: EndpointConnectionError"),
])
def test_dash_bad_root_url_is_exit_2_one_line(s3, root, env, msg):
    r = _cli("dash", root, "--port", free_port(), env=env())
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"moe-probe dash: error: {msg}")


@pytest.mark.parametrize("args, flag", [
    (["train", "--recipe", "moe", "--steps", "1", "--out", f"{BUCKET}/new"], "--out"),
    (["reproduce", "--quick", "--out", f"{BUCKET}/repro"], "--out"),
    (["diagnose", FIXTURES / "healthy", "--html", f"{BUCKET}/r.html"], "--html"),
])
def test_writing_to_a_url_is_refused_in_one_line(s3, args, flag):
    r = _cli(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"error: {flag} s3://moe/runs/" in r.stderr
    assert "writes runs to local directories only" in r.stderr
    assert not s3.fs().exists("moe/runs/new") and not s3.fs().exists("moe/runs/r.html")


def test_run_create_refuses_a_url(s3):
    with pytest.raises(ValueError, match="local directories only"):
        Run(f"{BUCKET}/new").create(store_attrs={}, store_coords={})


# ------------------------------------------------------------------------------ publishing
def test_publish_cli_copies_a_finished_run(s3, tmp_path):
    url = "s3://moe/published/collapse"
    r = _cli("publish", FIXTURES / "collapse", url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"published {FIXTURES / 'collapse'} to {url}: ")
    remote, local = moe_probe.open_run(url), moe_probe.open_run(FIXTURES / "collapse")
    for g in local.groups:
        assert remote.dataset(g).load().identical(local.dataset(g).load()), g


@pytest.mark.parametrize("args, msg", [
    ([FIXTURES / "healthy", "/tmp/x"], "publish to /tmp/x: not a URL"),
    ([_url("healthy"), "s3://moe/copy"], "the run to publish must be a local directory"),
    ([ROOT / "fixtures", "s3://moe/copy"], "not a moe_probe run (no traces.zarr)"),
    ([FIXTURES / "healthy", "s3://moe/copy", "--every", "0"], "--every must be > 0"),
])
def test_publish_bad_input_is_exit_2_one_line(s3, args, msg):
    r = _cli("publish", *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr


def _append(writer, step: int, L: int, M: int, E: int) -> None:
    """A routing row whose values say which step wrote them."""
    f = np.float32(step / 1000)
    writer.append("routing", step, tokens=np.full((L, M), step, np.int32),
                  kept=np.full((L, M), f, np.float32), capacity_rate=np.full((L, M), f, np.float32),
                  entropy=np.full((L, M), f, np.float32), maxvio=np.full((L, M), f, np.float32),
                  dead_frac=np.full((L, M), f, np.float32), confidence=np.full((L, M), f, np.float32),
                  load=np.full((L, M, E), step, np.int32), router_z=np.full(L, f, np.float32))


def test_publishing_a_live_run_never_shows_uncommitted_rows(s3, tmp_path):
    """A writer appends, a publisher publishes again and again, a reader of the URL reads
    meanwhile: every read holds exactly the rows below its marker, each the values written."""
    from moe_probe.publish import publish
    from moe_probe.run import store_path
    from moe_probe.store import StoreWriter

    run, url = tmp_path / "live", "s3://moe/live-copy"
    shutil.copytree(FIXTURES / "live", run)
    old = moe_probe.open_run(run).dataset("routing").load()
    first, sizes = int(old["step"].values[-1]) + 1, [old.sizes[k] for k in ("layer", "modality",
                                                                             "expert")]
    sent = publish(run, url)
    done, published, errors = threading.Event(), threading.Event(), []

    def write():
        writer, _ = StoreWriter.resume(store_path(run))
        try:
            for s in range(first, first + 40):
                _append(writer, s, *sizes)
                writer.flush()
                time.sleep(0.05)
        finally:
            writer.close()
            done.set()

    def publish_loop():
        nonlocal sent
        try:
            while not done.is_set():
                sent = publish(run, url, sent=sent)
            sent = publish(run, url, sent=sent)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            published.set()

    threads = [threading.Thread(target=write), threading.Thread(target=publish_loop)]
    for t in threads:
        t.start()
    seen = []
    while not published.is_set():
        ds = moe_probe.open_run(url).dataset("routing").load()
        steps = ds["step"].values
        n_old = int((steps < first).sum())
        # the marker read first sets the rows; the attrs come from a read a moment later
        assert ds.sizes["step"] <= ds.attrs["committed_steps"]
        assert n_old == old.sizes["step"] and ds.isel(step=slice(0, n_old)).identical(
            old.assign_attrs(committed_steps=ds.attrs["committed_steps"]))
        new = ds.isel(step=slice(n_old, None))
        np.testing.assert_array_equal(new["step"].values, np.arange(first, first + new.sizes["step"]))
        np.testing.assert_array_equal(new["load"].values.max(axis=(1, 2, 3)), new["step"].values)
        np.testing.assert_array_equal(new["capacity_rate"].values.min(axis=(1, 2)) * 1000,
                                      new["step"].values.astype(np.float32))
        seen.append(new.sizes["step"])
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen and seen == sorted(seen)  # a reader never goes back
    local = moe_probe.open_run(run)
    remote = moe_probe.open_run(url)
    for g in local.groups:
        assert remote.dataset(g).load().identical(local.dataset(g).load()), g

    # a resume truncates the local run below what was published: the URL follows it down
    StoreWriter.resume(store_path(run), after_step=first + 9)[0].close()
    publish(run, url, sent=sent)
    assert moe_probe.open_run(url).dataset("routing").load().identical(
        moe_probe.open_run(run).dataset("routing").load())
    assert moe_probe.open_run(url).committed_steps("routing") == old.sizes["step"] + 10


def test_publish_every_sends_only_what_changed(s3):
    import signal

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "moe_probe", "publish", FIXTURES / "healthy",
                          "s3://moe/every/healthy", "--every", "0.2"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [p.stdout.readline() for _ in range(2)]
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    n_files = sum(1 for f in (FIXTURES / "healthy").rglob("*") if f.is_file())
    assert f": {n_files} changed file(s) sent" in lines[0], lines
    assert ": 0 changed file(s) sent" in lines[1], lines
    assert p.returncode == 130 and "Traceback" not in err, err
