"""Load an HF causal LM offline and turn text files into fixed-length token windows.

Nothing here touches the network: a model directory is read with ``local_files_only=True``; a
config JSON (or a directory holding only ``config.json``) builds a random-weight model, seeded.

Tokens: the model directory's own tokenizer when it has one. Otherwise a deterministic
**word-hash fallback**: the text is split into words and punctuation marks (regex
``\\w+|[^\\w\\s]``), and each piece maps to ``RESERVED + blake2b(piece) mod (V − RESERVED)``, so the
same word always gets the same id in a given vocabulary and ids 0..RESERVED-1 (usually pad/bos/eos)
are never produced. Routing statistics of a *trained* model on hashed ids say little about its
real routing: use the model's tokenizer for those.

Legend: N windows, S sequence length.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

RESERVED = 3
_WORD = re.compile(r"\w+|[^\w\s]")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def _config_from_json(path: Path):
    from transformers import AutoConfig

    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable config JSON ({e})") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise ValueError(f"{path}: config JSON has no 'model_type'")
    d = dict(d)
    model_type = d.pop("model_type")
    d.pop("architectures", None)
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: unknown model_type {model_type!r} ({e})") from None


def load_model(spec: str, *, seed: int = 0, dtype=torch.float32):
    """``(model, tokenizer_or_None, source)`` for a model directory or a config JSON file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import CONFIG_NAME

    p = Path(spec)
    if not p.exists():
        raise ValueError(f"model path does not exist: {spec}")
    tokenizer = None
    if p.is_file():
        cfg = _config_from_json(p)
        weights = False
        source = f"config {p.name} (random weights, seed {seed})"
    else:
        if not (p / CONFIG_NAME).exists():  # the HF model's file (transformers names it), not a run's
            raise ValueError(f"{spec}: not a model directory (no {CONFIG_NAME})")
        cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
        weights = any(any(p.glob(g)) for g in _WEIGHT_GLOBS)
        source = f"directory {p}" + ("" if weights else f" (config only: random weights, seed {seed})")
        if any((p / f).exists() for f in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    try:
        if weights:
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype)
        else:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"{spec}: cannot build a causal LM ({str(e).splitlines()[0]})") from None
    # eval(): no dropout, and PhiMoE's router picks deterministically (Gumbel sampling in train).
    return model.eval(), tokenizer, source


def encode(text: str, tokenizer, vocab_size: int) -> list[int]:
    if tokenizer is not None:
        return list(tokenizer.encode(text, add_special_tokens=False))
    span = max(1, vocab_size - RESERVED)
    base = RESERVED if vocab_size > RESERVED else 0
    return [base + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % span
            for w in _WORD.findall(text)]


def decoder(tokenizer, vocab_size: int, paths):
    """``decode(ids) -> str`` of the run's tokens: its tokenizer's; else the inverse of the
    word-hash fallback over the words of the files at ``paths`` (pieces sharing an id joined
    with '|')."""
    if tokenizer is not None:
        return tokenizer.decode
    words: dict[int, dict[str, None]] = {}  # id -> pieces, in order of appearance
    for path in paths:
        for w in _WORD.findall(Path(path).read_text(encoding="utf-8", errors="replace")):
            words.setdefault(encode(w, None, vocab_size)[0], {})[w] = None
    return lambda ids: " ".join("|".join(words.get(int(i), [f"#{int(i)}"])) for i in ids)


_KIND = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


def read_typed_windows(path: str, tokenizer, vocab_size: int, seq_len: int):
    """Token windows [N, S] of a JSONL file of typed segments, one per line,
    ``{"type": "code", "text": "..."}``, and the kind of each token (the user's token-type
    mask): ``(ids_NS, kind_NS, kinds)``, kinds in order of first appearance (any number of them:
    they become the run's modalities). Segments are tokenized one by one and concatenated in
    file order; windows as in `read_windows`."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file does not exist: {path}")
    ids: list[int] = []
    kind_ids: list[int] = []
    kinds: list[str] = []
    try:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            seg = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not (isinstance(seg, dict) and isinstance(seg.get("type"), str)
                and isinstance(seg.get("text"), str)):
            raise ValueError(f'{path}:{n}: expected {{"type": "<kind>", "text": "..."}}')
        kind = seg["type"]
        if not _KIND.fullmatch(kind):
            raise ValueError(f"{path}:{n}: token kind {kind!r} must be a name (letters, digits, _)")
        if kind not in kinds:
            kinds.append(kind)
        seg_ids = encode(seg["text"], tokenizer, vocab_size)
        ids += seg_ids
        kind_ids += [kinds.index(kind)] * len(seg_ids)
    if len(ids) < 2:
        raise ValueError(f"{path}: fewer than 2 tokens of text")
    return _windows(ids, seq_len), _windows(kind_ids, seq_len), kinds


def _windows(ids: list[int], seq_len: int) -> torch.Tensor:
    if len(ids) < seq_len:
        return torch.tensor(ids, dtype=torch.long)[None]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def read_windows(path: str, tokenizer, vocab_size: int, seq_len: int) -> torch.Tensor:
    """Token windows [N, S] of a text file: consecutive, non-overlapping; the tail shorter than
    S is dropped, except when the whole file is shorter than S (then one window of all of it)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"text file does not exist: {path}")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    ids = encode(text, tokenizer, vocab_size)
    if len(ids) < 2:
        raise ValueError(f"{path}: fewer than 2 tokens of text")
    return _windows(ids, seq_len)
