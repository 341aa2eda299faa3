"""Remote stores: runs read from a real S3-compatible server on loopback (moto's standalone server,
fixtures/s3server.py) through s3fs, against the same runs read from disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
