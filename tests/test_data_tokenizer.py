from moe_probe.data.tokenizer import CAPTION_WORDS, DIGIT_WORDS, SPECIALS, Tokenizer, split_words


def test_build_is_deterministic_and_sized():
    a, b = Tokenizer.build(300), Tokenizer.build(300)
    assert a == b
    assert a.vocab_size == len(SPECIALS) + len(CAPTION_WORDS) + 300
    assert (a.pad, a.unk, a.bos, a.eos, a.img) == (0, 1, 2, 3, 4)
    assert a.words[: len(SPECIALS)] == list(SPECIALS)


def test_vocab_is_most_frequent_corpus_words():
    from collections import Counter

    from pydoc_data.topics import topics

    counts = Counter(w for k in topics for w in split_words(topics[k]))
    tok = Tokenizer.build(50)
    corpus_part = tok.words[len(SPECIALS) + len(CAPTION_WORDS):]
    top = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
           if w not in CAPTION_WORDS][:50]
    assert corpus_part == top
    assert "the" in corpus_part  # sanity: the commonest English word


def test_caption_words_and_digit_ids():
    tok = Tokenizer.build(0)
    assert [tok.words[i] for i in tok.digit_ids] == list(DIGIT_WORDS)
    assert tok.encode("this digit is seven") == [tok.token_id(w) for w in ("this", "digit", "is", "seven")]
    assert tok.unk not in tok.encode("draw a nine")


def test_round_trip_and_unknown_words():
    tok = Tokenizer.build(2000)
    text = "The return statement (in a function) is 42 ."
    ids = tok.encode(text)
    assert tok.decode(ids) == "the return statement ( in a function ) is 42 ."
    assert tok.encode(tok.decode(ids)) == ids
    assert tok.encode("zzqxv") == [tok.unk]


def test_state_dict_round_trip():
    tok = Tokenizer.build(100)
    again = Tokenizer.from_state_dict(tok.state_dict())
    assert again == tok
    assert again.encode("draw a seven please") == tok.encode("draw a seven please")
