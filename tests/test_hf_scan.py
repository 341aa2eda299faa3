"""`moe-probe scan` end to end: CLI exit codes, the store it writes, and what the store says.

Store counts are checked against the model's own ``output_router_logits`` top-k on the very
batches the scan ran (rebuilt here from the same windows), not against the adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from moe_probe.cli import main  # noqa: E402
from moe_probe.hf.loading import load_model, read_windows  # noqa: E402
from moe_probe.run import open_run  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


def _text(path: Path, seed: int, n: int = 600) -> Path:
    rng = np.random.default_rng(seed)
    words = WORDS[seed * 5: seed * 5 + 14]  # two overlapping vocabularies
    path.write_text(" ".join(rng.choice(words, n)) + "\n")
    return path


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("scan")
    a, b = _text(d / "a.txt", 0), _text(d / "b.txt", 1)
    out = d / "run"
    rc = main(["scan", "--model", str(FIX / "qwen2_moe.json"), "--text", str(a), "--text-b", str(b),
               "--out", str(out), "--batch-size", "2", "--seq-len", "32", "--max-batches", "4",
               "--advise-groups", str(d / "groups.json"), "--und-fraction", "0.75", "--quiet"])
    assert rc == 0
    return d, a, b, out


def test_scan_store_reads_and_follows_schema(qwen_run):
    d, _, _, out = qwen_run
    run = open_run(out)
    assert set(run.groups) == {"routing", "loss", "grad", "probe", "grad_expert", "token_routing"}
    assert run.attrs["model"]["arch"] == "qwen2_moe"
    assert run.attrs["model"]["shared_experts"] == 1
    assert run.attrs["modalities"] == ["text", "text_b"]
    r = run.dataset("routing")
    assert list(r["modality"].values) == ["text", "text_b"]
    assert list(r["layer"].values) == ["0", "1"]
    assert list(r["step"].values) == [0, 1, 2, 3]
    tokens = r["tokens"].values
    assert (tokens == 2 * 32).all()  # 2 windows of 32 tokens per modality per step
    np.testing.assert_array_equal(r["load"].values.sum(-1), tokens * 2)  # top-2
    assert ((r["capacity_rate"].values > 0) & (r["capacity_rate"].values <= 1)).all()
    g = run.dataset("grad")
    assert list(g["layer"].values) == ["0", "1", "all"]
    cos = g["cosine"].sel(component=["attn", "router", "shared", "experts", "norm"]).values
    assert np.isfinite(cos).all() and (np.abs(cos) <= 1).all()
    assert np.isnan(g["cosine"].sel(component="und_experts").values).all()
    p = run.dataset("probe")
    assert list(p["task"].values) == ["source", "position"]
    acc = p["accuracy"].values
    assert np.isfinite(acc).all() and ((acc >= 0) & (acc <= 1)).all()
    np.testing.assert_allclose(p["selectivity"].values, acc - p["control_accuracy"].values, atol=1e-6)
    iso = p["isolated"].sel(metric=["lm_full", "lm_shared_only"]).values
    assert np.isfinite(iso).all()
    e = xr.open_zarr(run.store_path, group="grad_expert", consolidated=False)
    assert e["cosine"].dims == ("step", "layer", "expert")
    # Written through the writer: same rows as `grad`, checksummed chunks, commit marker.
    assert list(run.dataset("grad_expert")["step"].values) == list(g["step"].values)
    codecs = [c["name"] for c in json.loads((run.store_path / "grad_expert" / "cosine" /
                                             "zarr.json").read_text())["codecs"]]
    assert "crc32c" in codecs and e.attrs["committed_steps"] == g.sizes["step"]
    # Per-expert squared norms add up to the layer's routed-experts norm².
    np.testing.assert_allclose((e["norm_und"].values ** 2).sum(-1),
                               g["norm_und"].sel(component="experts", layer=["0", "1"]).values ** 2,
                               rtol=1e-4)


def test_scan_counts_equal_model_router_logits(qwen_run):
    _, a, b, out = qwen_run
    model, tok, _ = load_model(str(FIX / "qwen2_moe.json"), seed=0)
    wa = read_windows(str(a), tok, model.config.vocab_size, 32)
    wb = read_windows(str(b), tok, model.config.vocab_size, 32)
    ref = np.zeros((4, 2, 2, 8), dtype=np.int64)  # step, layer, modality, expert
    for s in range(4):
        ids = torch.cat([wa[2 * s: 2 * s + 2], wb[2 * s: 2 * s + 2]])
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits
        for li, lg in enumerate(logits):
            picks = torch.softmax(lg.float(), -1).topk(2, -1).indices.view(2, 2 * 32 * 2)
            for m in range(2):
                ref[s, li, m] = np.bincount(picks[m].numpy(), minlength=8)
    np.testing.assert_array_equal(open_run(out).dataset("routing")["load"].values, ref)


def test_scan_token_routing_is_the_models_own_topk_on_the_probe_windows(qwen_run):
    from moe_probe.hf.scan import PROBE_WINDOWS

    _, a, b, out = qwen_run
    model, tok, _ = load_model(str(FIX / "qwen2_moe.json"), seed=0)
    wa = read_windows(str(a), tok, model.config.vocab_size, 32)[:PROBE_WINDOWS]
    wb = read_windows(str(b), tok, model.config.vocab_size, 32)[:PROBE_WINDOWS]
    ids = torch.cat([wa, wb])
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    run = open_run(out)
    ds = run.dataset("token_routing")
    assert list(ds.step.values) == [3]  # the scan's last step
    np.testing.assert_array_equal(ds.token_id.values[0], ids.reshape(-1).numpy())
    kind = np.r_[np.zeros(wa.numel()), np.ones(wb.numel())]
    np.testing.assert_array_equal(ds.kind.values[0], kind)
    np.testing.assert_array_equal(ds.label.values[0], kind)  # label = the text set
    assert run.attrs["token_routing"]["labels"] == {"source": ["text", "text_b"]}
    for li, lg in enumerate(logits):
        want = torch.softmax(lg.float(), -1).topk(2, -1)
        np.testing.assert_array_equal(ds.topk_ids.values[0, li], want.indices.numpy())
    # no tokenizer in the fixture: ids are hashed words (hf/loading.py), decoded back to them
    assert tok is None
    vocab = run.attrs["token_routing"]["vocab"]
    assert set(vocab.values()) <= set(WORDS[:19]) and len(vocab) == len(np.unique(ids))


def test_advice_is_choose_groups_of_text_counts(qwen_run):
    from moe_probe.model.convert import choose_groups

    d, _, _, out = qwen_run
    doc = json.loads((d / "groups.json").read_text())
    assert doc["format"] == "moe_probe.groups/1"
    load = open_run(out).dataset("routing")["load"].sel(modality="text").values.sum(0)  # L, E
    np.testing.assert_array_equal(np.array(doc["counts"]), load)
    assert doc["groups"] == [list(g) for g in choose_groups(load, 0.75)]
    for und, gen in zip(doc["groups"], doc["gen"]):
        assert len(und) == 6 and sorted(und + gen) == list(range(8))
        # the und group holds the most-used experts
        assert min(load[doc["groups"].index(und)][und]) >= max(load[doc["groups"].index(und)][gen])


def test_single_text_scan_without_shared_experts(tmp_path):
    a = _text(tmp_path / "a.txt", 0)
    out = tmp_path / "run"
    rc = main(["scan", "--model", str(FIX / "mixtral.json"), "--text", str(a), "--out", str(out),
               "--batch-size", "2", "--seq-len", "16", "--max-batches", "2", "--quiet"])
    assert rc == 0
    run = open_run(out)
    assert set(run.groups) == {"routing", "loss", "token_routing"}  # no text-b: no grad; no shared: no probe
    assert list(run.dataset("routing")["modality"].values) == ["text"]


@pytest.mark.parametrize("argv,needle", [
    (["--model", str(FIX / "llama_dense.json")], "no MoE layer"),
    (["--model", "/nonexistent/model_dir"], "does not exist"),
    (["--model", str(FIX / "qwen2_moe.json"), "--batch-size", "0"], "--batch-size"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, needle):
    a = _text(tmp_path / "a.txt", 0)
    rc = main(["scan", *argv, "--text", str(a), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_missing_text_exits_2(tmp_path, capsys):
    rc = main(["scan", "--model", str(FIX / "mixtral.json"), "--text", str(tmp_path / "nope.txt"),
               "--out", str(tmp_path / "r"), "--quiet"])
    assert rc == 2 and "text file does not exist" in capsys.readouterr().err


def test_structural_scan_equals_table_scan(tmp_path, monkeypatch):
    """A family treated as unknown (table disabled) gives the same store counts as the table."""
    a = _text(tmp_path / "a.txt", 2)
    loads = {}
    for mode in ("table", "structural"):
        if mode == "structural":
            monkeypatch.setenv("MOE_PROBE_HF_STRUCTURAL", "1")
        out = tmp_path / mode
        assert main(["scan", "--model", str(FIX / "olmoe.json"), "--text", str(a), "--out", str(out),
                     "--batch-size", "2", "--seq-len", "16", "--max-batches", "2", "--quiet"]) == 0
        run = open_run(out)
        assert run.attrs["model"]["discovery"] == ("table:olmoe" if mode == "table" else "structural")
        loads[mode] = run.dataset("routing")["load"].values
    np.testing.assert_array_equal(loads["table"], loads["structural"])


KINDS = ("prose", "code", "math", "table", "dialog")


@pytest.mark.parametrize("n_kinds", [2, 5])
def test_typed_segments_are_modalities(tmp_path, n_kinds):
    """A .jsonl --text labels each token with its segment's kind (a token-type mask), any number
    of kinds: the store's modalities are the kinds, tokens per kind equal the tokens of that kind
    fed in, and per-kind expert counts equal the model's own router-logit top-k over exactly
    those tokens."""
    rng = np.random.default_rng(3)
    vocab = [WORDS[3 * m: 3 * m + 12] for m in range(n_kinds)]  # overlapping word sets per kind
    segs = [{"type": KINDS[i % n_kinds], "text": " ".join(rng.choice(vocab[i % n_kinds], rng.integers(3, 9)))}
            for i in range(120)]
    src = tmp_path / "typed.jsonl"
    src.write_text("\n".join(json.dumps(s) for s in segs) + "\n")
    out = tmp_path / "run"
    assert main(["scan", "--model", str(FIX / "mixtral.json"), "--text", str(src), "--out", str(out),
                 "--batch-size", "2", "--seq-len", "16", "--max-batches", "3", "--quiet"]) == 0
    run = open_run(out)
    r = run.dataset("routing")
    assert list(r["modality"].values) == list(KINDS[:n_kinds])
    assert run.attrs["modalities"] == list(KINDS[:n_kinds])
    from moe_probe.hf.loading import read_typed_windows
    model, tok, _ = load_model(str(FIX / "mixtral.json"), seed=0)
    ids, kind, kinds = read_typed_windows(str(src), tok, model.config.vocab_size, 16)
    assert kinds == list(KINDS[:n_kinds])
    E, K = model.config.num_local_experts, model.config.num_experts_per_tok
    for s in range(3):
        batch, k = ids[2 * s: 2 * s + 2], kind[2 * s: 2 * s + 2].reshape(-1)
        assert set(k.tolist()) == set(range(n_kinds))  # every kind is fed in at every step
        with torch.no_grad():
            logits = model(input_ids=batch, output_router_logits=True).router_logits
        for li, lg in enumerate(logits):
            picks = torch.softmax(lg.float(), -1).topk(K, -1).indices  # T, K
            for m in range(n_kinds):
                want = np.bincount(picks[k == m].reshape(-1).numpy(), minlength=E)
                np.testing.assert_array_equal(r["load"].isel(step=s, layer=li)
                                              .sel(modality=kinds[m]).values, want)
                assert int(r["tokens"].isel(step=s, layer=li).sel(modality=kinds[m])) == int((k == m).sum())
    assert (r["tokens"].values.sum(-1) == 2 * 16).all()  # every token under exactly one kind
    assert np.isfinite(r["capacity_rate"].values).all()


@pytest.mark.parametrize("lines,needle", [
    (['{"type": "a", "text": "x y"}', "not json"], "not JSON"),
    (['{"kind": "a", "text": "x y"}'], 'expected {"type"'),
    (['{"type": "a b", "text": "x y"}'], "must be a name"),
])
def test_bad_typed_segments_exit_2(tmp_path, capsys, lines, needle):
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join(lines) + "\n")
    rc = main(["scan", "--model", str(FIX / "mixtral.json"), "--text", str(src),
               "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]
