"""Word-level tokenizer built locally from Python's bundled docs (``pydoc_data.topics``).

No download, no randomness: the vocabulary is the special tokens, then the caption/prompt words
the image tasks need, then the ``n_words`` most frequent corpus words (ties broken alphabetically).
Text is lower-cased and split into words, numbers and single punctuation marks, so
``decode(encode(s))`` gives back ``s`` up to case and spacing (and unknown words -> ``<unk>``).
"""

from __future__ import annotations

import functools
import re
from collections import Counter

SPECIALS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>", "<img>")
"""Special tokens, ids 0..4 in this order (pad is always id 0)."""

DIGIT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)
"""Digit class c is captioned / prompted with ``DIGIT_WORDS[c]``."""

CAPTION_WORDS: tuple[str, ...] = ("this", "digit", "is", "draw", "a") + DIGIT_WORDS
"""Words of "this digit is <d>" (MMU) and "draw a <d>" (T2I); always in the vocabulary."""

_WORD_RE = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words, numbers and single punctuation marks."""
    return _WORD_RE.findall(text.lower())


@functools.lru_cache(maxsize=1)
def _corpus_counts() -> tuple[tuple[str, int], ...]:
    from pydoc_data.topics import topics

    counts = Counter()
    for key in sorted(topics):
        counts.update(split_words(topics[key]))
    # Sorted by (-count, word) so the vocabulary does not depend on dict order.
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class Tokenizer:
    """Word-level tokenizer; ``Tokenizer.build(n_words)`` makes the standard one."""

    def __init__(self, words: list[str]):
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError("tokenizer vocabulary must start with the special tokens " + str(SPECIALS))
        if len(set(words)) != len(words):
            raise ValueError("tokenizer vocabulary has duplicate words")
        self.words: list[str] = list(words)
        self._ids = {w: i for i, w in enumerate(self.words)}
        self.pad, self.unk, self.bos, self.eos, self.img = range(len(SPECIALS))

    @classmethod
    def build(cls, n_words: int = 2000) -> "Tokenizer":
        """Specials + caption words + the ``n_words`` most frequent pydoc words not already in."""
        if n_words < 0:
            raise ValueError(f"tokenizer n_words must be >= 0, got {n_words}")
        words = list(SPECIALS) + list(CAPTION_WORDS)
        seen = set(words)
        for w, _ in _corpus_counts():
            if len(words) >= len(SPECIALS) + len(CAPTION_WORDS) + n_words:
                break
            if w not in seen:
                words.append(w)
                seen.add(w)
        return cls(words)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def token_id(self, word: str) -> int:
        return self._ids.get(word, self.unk)

    @property
    def digit_ids(self) -> list[int]:
        """Ids of "zero".."nine" (index = digit class)."""
        return [self._ids[w] for w in DIGIT_WORDS]

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(w, self.unk) for w in split_words(text)]

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids)

    def state_dict(self) -> dict:
        return {"words": list(self.words)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        return cls(list(state["words"]))

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.words == other.words

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
