"""Both tokenizers round-trip exactly and load identically in transformers."""

import pytest

from tokenizer import Tokenizer, TokenizerError

CORPUS = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
          + "naïve café — 東京 🎉 tabs\there  and   spaces\r\n" * 5)
TRICKY = ["", " ", "\n\n\n", "  leading and trailing  ", "tabs\t\tand\r\nwindows", "emoji 🎉🦙 and 👩‍👩‍👧",
          "unicode: naïve café 東京 Ελληνικά", "digits 1234567 3.14159", "it's they're we'll",
          "whitespace   runs    \n  \n\t"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe([CORPUS], vocab_size=300)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return Tokenizer.train_char(CORPUS)


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trip_is_exact(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_char_round_trip_and_ids(char):
    text = "Speak, speak.\n東京 🎉"
    assert char.decode(char.encode(text)) == text
    chars = sorted(set(CORPUS))
    assert char.encode("All") == [chars.index(c) for c in "All"]  # nanoGPT's sorted-character ids
    assert char.vocab_size == len(chars) + 1 and char.bos_id == char.eos_id == len(chars)


def test_special_tokens_and_batch(bpe):
    assert (bpe.bos_id, bpe.eos_id) == (0, 1) and bpe.vocab_size == 300
    ids = bpe.encode("hear me", bos=True, eos=True)
    assert ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id
    assert bpe.decode(ids, skip_special=True) == "hear me"
    assert bpe.encode_batch(["a b", "speak"]) == [bpe.encode("a b"), bpe.encode("speak")]


def test_unknown_char_is_one_clear_line(char):
    with pytest.raises(TokenizerError, match=r"character 'Z' \(U\+005A\) is not in this char-level vocabulary"):
        char.encode("Zebra")


def test_bpe_vocab_too_small():
    with pytest.raises(TokenizerError, match="below the 256-byte alphabet plus 3 special tokens: use at least 259"):
        Tokenizer.train_bpe(["abc"], vocab_size=200)


def test_empty_corpus_for_char():
    with pytest.raises(TokenizerError, match="empty corpus"):
        Tokenizer.train_char("")


def test_training_sample_is_bounded():
    # Merges learned from the first 40 bytes only cannot know a word that appears after them.
    texts = ["aaaa bbbb " * 4, "zzzzzzzz " * 100]
    small = Tokenizer.train_bpe(texts, vocab_size=280, max_bytes=40)
    assert len(small.encode("zzzzzzzz")) > 2


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_load_and_transformers_agree(kind, bpe, char, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = bpe if kind == "bpe" else char
    ours.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.kind, loaded.hash, loaded.bos_id, loaded.eos_id) == (kind, ours.hash, ours.bos_id, ours.eos_id)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = TRICKY + [CORPUS] if kind == "bpe" else [CORPUS, "speak speak\n"]
    for text in texts:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
        assert theirs.decode(ours.encode(text)) == text
    assert theirs.eos_token_id == ours.eos_id


def test_load_without_files(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path)
