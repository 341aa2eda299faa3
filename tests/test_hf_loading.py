"""Offline loading: a saved model directory (weights, optional tokenizer) and the hash fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from moe_probe.hf.loading import RESERVED, encode, load_model, read_windows  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def test_model_directory_loads_its_weights_and_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    model, _, _ = load_model(str(FIX / "mixtral.json"), seed=5)
    model.save_pretrained(tmp_path / "m")
    vocab = {"[UNK]": 0, "hello": 7, "world": 9}
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(tmp_path / "m")

    loaded, tok, source = load_model(str(tmp_path / "m"), seed=0)  # seed must not matter
    assert tok is not None and "directory" in source and "random" not in source
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
    assert encode("hello world zzz", tok, 256) == [7, 9, 0]


def test_config_only_directory_is_random_and_seeded(tmp_path):
    model, _, _ = load_model(str(FIX / "olmoe.json"), seed=3)
    model.config.save_pretrained(tmp_path / "c")
    a, tok, source = load_model(str(tmp_path / "c"), seed=3)
    assert tok is None and "random weights" in source
    for p, q in zip(model.parameters(), a.parameters()):
        assert torch.equal(p, q)


def test_hash_fallback_is_deterministic_and_avoids_reserved_ids(tmp_path):
    ids = encode("the cat, the dog.", None, 50)
    assert ids == encode("the cat, the dog.", None, 50)
    assert len(ids) == 6 and ids[0] == ids[3]  # "the" twice; "," and "." are tokens
    assert all(RESERVED <= i < 50 for i in ids)
    (tmp_path / "t.txt").write_text("a b c d e f g")
    w = read_windows(str(tmp_path / "t.txt"), None, 50, 3)
    assert w.shape == (2, 3)  # the 7th token is dropped
    assert read_windows(str(tmp_path / "t.txt"), None, 50, 100).shape == (1, 7)


def test_bad_model_specs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "x.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="model_type"):
        load_model(str(tmp_path / "x.json"))
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path / "d"))
