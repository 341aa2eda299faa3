"""`moe-probe export` into the real tools, read back through each tool's own reader: TensorBoard's
EventAccumulator, the W&B offline run's `.wandb` log, MLflow's client on a local file store. Bad
input is one line, exit 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_probe.cli import main  # noqa: E402
from moe_probe.export.history import read_summary  # noqa: E402
from moe_probe.export.sinks import PARAMS_TAG  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _wandb_log import wandb_history, wandb_records  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The collapse fixture: findings, a grad group every 10 steps, NaN-free kinds."""
    from fixtures.generate import build

    out = tmp_path_factory.mktemp("export_tools")
    build("collapse", out)
    return out / "collapse"


@pytest.fixture(scope="module")
def expected(run):
    s = read_summary(run)
    return s, {k: s.series(k) for k in s.keys}


def _cli(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "moe_probe", "export", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_tensorboard_reads_back_every_key_at_every_step(run, expected, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    s, series = expected
    assert main(["export", str(run), "--tensorboard", str(tmp_path / "tb")]) == 0
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    assert sorted(ea.Tags()["scalars"]) == sorted(s.keys)
    for key, (steps, vals) in series.items():
        events = ea.Scalars(key)
        np.testing.assert_array_equal([e.step for e in events], steps, err_msg=key)
        # TensorBoard scalars are float32
        np.testing.assert_array_equal([e.value for e in events], vals.astype(np.float32),
                                      err_msg=key)
    text = tensor_util.make_ndarray(ea.Tensors(PARAMS_TAG)[0].tensor_proto).item().decode()
    assert str((run / "traces.zarr").resolve()) in text


def test_wandb_offline_run_holds_the_same_keys_and_values(run, expected, tmp_path):
    s, _ = expected
    r = _cli(run, "--wandb", "--wandb-project", "moe-probe-test",
             env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr
    [log] = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    records = wandb_records(log)
    got = wandb_history(records)
    want = dict(s.rows())
    assert sorted(got) == sorted(want)
    assert got == want  # same keys at each step, the same float64 values
    [run_rec] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {it.key: json.loads(it.value_json) for it in run_rec.config.update}
    assert config["moe_probe_store"] == str((run / "traces.zarr").resolve())


def test_mlflow_file_store_gets_the_metrics(run, expected, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    s, series = expected
    # MLflow 3 refuses its file store unless asked for; the user names the store with the URI
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    assert main(["export", str(run), "--mlflow", uri, "--experiment", "exp"]) == 0
    client = MlflowClient(tracking_uri=uri)
    [mrun] = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert mrun.info.run_name == "collapse" and mrun.info.status == "FINISHED"
    assert mrun.data.params["moe_probe_store"] == str((run / "traces.zarr").resolve())
    assert sorted(mrun.data.metrics) == sorted(s.keys)
    for key, (steps, vals) in series.items():
        hist = sorted(client.get_metric_history(mrun.info.run_id, key), key=lambda m: m.step)
        np.testing.assert_array_equal([m.step for m in hist], steps, err_msg=key)
        np.testing.assert_array_equal([m.value for m in hist], vals, err_msg=key)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("args, says", [
    (["{tmp}/nope", "--tensorboard", "{tmp}/tb"], "no such run directory"),
    (["{run}"], "choose where to export"),
    (["{run}", "--mlflow", "http://127.0.0.1:{port}"], "cannot reach 127.0.0.1"),
    (["{run}", "--mlflow", "nosuchscheme://x/y"], "MLflow nosuchscheme://x/y"),
    (["{run}", "--tensorboard", "{file}"], "is a file, not a directory"),
])
def test_bad_input_is_one_line_exit_2(run, tmp_path, capsys, args, says):
    (tmp_path / "f").write_text("")
    fill = {"tmp": tmp_path, "run": run, "port": _free_port(), "file": tmp_path / "f"}
    rc = main(["export", *(a.format(**fill) for a in args), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("moe-probe export: error: ") and says in err


@pytest.mark.parametrize("flag, module, package", [
    (["--tensorboard", "tb"], "tensorboard", "tensorboard"),
    (["--wandb"], "wandb", "wandb"),
    (["--mlflow", "file:///x"], "mlflow", "mlflow-skinny"),
])
def test_a_missing_client_names_the_install(run, tmp_path, capsys, monkeypatch, flag, module,
                                            package):
    monkeypatch.setitem(sys.modules, module, None)  # how Python spells "not installed"
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), *flag, "--no-findings", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install {package}" in err
    assert "pip install 'moe_probe[export]'" in err


def test_export_never_imports_torch(run, tmp_path):
    code = f"""
import sys
from moe_probe.cli import main
assert main(["export", {str(run)!r}, "--tensorboard", {str(tmp_path / 'tb')!r}, "--wandb",
             "--quiet"]) == 0
assert "torch" not in sys.modules, "torch was imported"
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
           "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
