"""Live export during `moe-probe train --report-to` and `moe_probe.watch(report_to=...)`: each tool
holds, step for step, the keys and values `moe-probe export --no-findings` writes from the finished
store (read back through each tool's own reader), the store path in its run config. A missing
client is refused in one line before anything is trained or created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from _wandb_log import wandb_history, wandb_records  # noqa: E402
from moe_probe.cli import main  # noqa: E402
from moe_probe.export.history import read_summary  # noqa: E402
from moe_probe.export.sinks import PARAMS_TAG  # noqa: E402

STEPS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny stage-2 run (its base trained first, not reported) with all three tools live (W&B
    offline, MLflow on a file store): three kinds, one absent at some steps, grad rows every 4."""
    out = tmp_path_factory.mktemp("live_train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline",
           "WANDB_DIR": str(out), "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"}
    r = subprocess.run(
        [sys.executable, "-m", "moe_probe", "train", "--recipe", "tiny-symbiotic", "--out",
         str(out / "run"), "--steps", str(STEPS), "--quiet", "--set", "trace.grad_every=4",
         "--report-to", "tensorboard,wandb,mlflow", "--mlflow-uri", (out / "mlruns").as_uri(),
         "--wandb-project", "moe-probe-test"],
        capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "live export" not in r.stderr  # no tool dropped mid-run
    s = read_summary(out / "run", findings=False)
    assert s.steps.tolist() == list(range(STEPS)) and len(s.keys) == 19
    assert np.isfinite(s.values).any(0).all() and not np.isfinite(s.values).all()
    return out, s


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea, {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def _assert_tensorboard_equals_export(run_dir, live_dir, tmp_path):
    from tensorboard.util import tensor_util

    assert main(["export", str(run_dir), "--tensorboard", str(tmp_path / "post"), "--no-findings",
                 "--quiet"]) == 0
    ea, live = _scalars(live_dir)
    _, post = _scalars(tmp_path / "post")
    s = read_summary(run_dir, findings=False)
    assert sorted(live) == sorted(post) == sorted(k for k in s.keys if np.isfinite(s.series(k)[1]).any())
    assert live == post  # every key: the same steps, the same (float32) values
    text = tensor_util.make_ndarray(ea.Tensors(PARAMS_TAG)[0].tensor_proto).item().decode()
    assert str((Path(run_dir) / "traces.zarr").resolve()) in text


def test_train_tensorboard_live_equals_the_export(trained, tmp_path):
    out, _ = trained
    _assert_tensorboard_equals_export(out / "run", out / "run" / "tb", tmp_path)


def test_train_mlflow_live_holds_the_stores_values(trained, monkeypatch):
    from mlflow.tracking import MlflowClient

    out, s = trained
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    [mrun] = client.search_runs([client.get_experiment_by_name("moe-probe").experiment_id])
    assert mrun.info.run_name == "run" and mrun.info.status == "FINISHED"
    assert mrun.data.params["moe_probe_store"] == str((out / "run" / "traces.zarr").resolve())
    assert sorted(mrun.data.metrics) == sorted(s.keys)
    for key in s.keys:
        steps, vals = s.series(key)
        hist = sorted(client.get_metric_history(mrun.info.run_id, key), key=lambda m: m.step)
        np.testing.assert_array_equal([m.step for m in hist], steps, err_msg=key)
        np.testing.assert_array_equal([m.value for m in hist], vals, err_msg=key)  # float64


def test_train_wandb_offline_live_holds_the_stores_values(trained):
    out, s = trained
    [log] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    records = wandb_records(log)
    assert wandb_history(records) == dict(s.rows())
    [run_rec] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {it.key: json.loads(it.value_json) for it in run_rec.config.update}
    assert config["moe_probe_store"] == str((out / "run" / "traces.zarr").resolve())


def test_watch_hf_loop_tensorboard_live_equals_the_export(tmp_path):
    """A Hugging Face MoE in a plain loop: two kinds, gradient conflict every other step."""
    import torch

    from moe_probe import watch
    from moe_probe.hf.capture import lm_loss
    from moe_probe.hf.loading import load_model

    torch.manual_seed(0)
    model, _, _ = load_model(str(ROOT / "fixtures" / "hf" / "mixtral.json"), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with watch(model, tmp_path / "run", kind_names=["text", "code"], grad_every=2,
               tasks=("a", "b"), kinds=lambda input_ids, **_: input_ids % 2 == 0,
               report_to=("tensorboard",)) as w:
        for step in range(5):
            ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=g)
            logits = model(input_ids=ids).logits
            la, lb = lm_loss(logits[:1], ids[:1]), lm_loss(logits[1:], ids[1:])
            w.backward({"a": la, "b": lb})
            opt.step()
            opt.zero_grad(set_to_none=True)
            w.step(step, losses={"total": float((la + lb).detach())})
    assert read_summary(tmp_path / "run", findings=False).steps.tolist() == list(range(5))
    _assert_tensorboard_equals_export(tmp_path / "run", tmp_path / "run" / "tb", tmp_path)


def test_under_ddp_only_rank_0_reports(tmp_path):
    """Two ranks under torchrun: one event file, holding what the export writes from the store."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(Path(__file__).with_name("_watch_ddp.py")),
                        str(tmp_path / "run"), "tensorboard"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(list((tmp_path / "run" / "tb").iterdir())) == 1
    _assert_tensorboard_equals_export(tmp_path / "run", tmp_path / "run" / "tb", tmp_path)


@pytest.mark.parametrize("tool, module, package", [
    ("tensorboard", "tensorboard", "tensorboard"),
    ("wandb", "wandb", "wandb"),
    ("mlflow", "mlflow", "mlflow-skinny"),
])
def test_a_missing_client_stops_train_before_it_starts(tmp_path, capsys, monkeypatch, tool,
                                                       module, package):
    monkeypatch.setitem(sys.modules, module, None)  # how Python spells "not installed"
    rc = main(["train", "--recipe", "tiny-base", "--out", str(tmp_path / "run"), "--quiet",
               "--report-to", tool, "--mlflow-uri", (tmp_path / "mlruns").as_uri()])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and f"pip install {package}" in err
    assert not (tmp_path / "run").exists()


def test_a_missing_client_stops_watch_before_it_creates_the_run(tmp_path, monkeypatch):
    from moe_probe import watch
    from moe_probe.hf.loading import load_model

    model, _, _ = load_model(str(ROOT / "fixtures" / "hf" / "mixtral.json"), seed=0)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ValueError, match=r"pip install tensorboard\)$"):
        watch(model, tmp_path / "run", report_to="tensorboard")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, says", [
    (["--report-to", "tensorboard,tb"], "unknown tool 'tb'; choose from tensorboard, wandb, mlflow"),
    (["--report-to", "mlflow"], "needs a tracking URI: --mlflow-uri URI"),
])
def test_bad_report_options_are_one_line_exit_2(tmp_path, capsys, monkeypatch, args, says):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = main(["train", "--recipe", "tiny-base", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and says in err
    assert not (tmp_path / "run").exists()
