"""glm_ext.tokenizer: byte-level BPE with GLM's special tokens (trained, or GPT-2 files with the authors' ids)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from glm_ext.data.corpus import default_corpus
from glm_ext.tokenizer import SPEC_NAMES, SPECIAL_TOKENS, GLMTokenizer, SpecialIds

TRAIN_TOPICS = 25
VOCAB_SIZE = 800


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return default_corpus()


@pytest.fixture(scope="module")
def trained(corpus) -> GLMTokenizer:
    return GLMTokenizer.train(corpus[:TRAIN_TOPICS], VOCAB_SIZE)


GPT2_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("?", "!")]
GPT2_IDS = SpecialIds(pad=50256, eos=50256, sop=50257, eop=50258, cls=50259, mask=50260, sep=50261,
                      unk=50262, gmask=50263, smask=50264)


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """A GPT-2-shaped vocab.json/merges.txt: the byte alphabet, a few merges, fillers, <|endoftext|> at 50256."""
    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in GPT2_MERGES:
        vocab[left + right] = len(vocab)
    while len(vocab) < 50256:
        vocab[f"filler{len(vocab)}"] = len(vocab)
    vocab["<|endoftext|>"] = 50256
    folder = tmp_path_factory.mktemp("gpt2")
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = "".join(f"{left} {right}\n" for left, right in GPT2_MERGES)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt", vocab


@pytest.fixture(scope="module")
def gpt2(gpt2_files) -> GLMTokenizer:
    return GLMTokenizer.from_gpt2_files(*gpt2_files[:2])


def test_trained_special_ids_are_0_to_9_in_spec_order(trained):
    assert trained.special_ids == SpecialIds(*range(10))
    for position, name in enumerate(SPEC_NAMES):
        assert trained.token_to_id(name) == position
    assert trained.token_to_id("<|startofpiece|>") == trained.special_ids.sop
    assert trained.token_to_id("a") == trained.encode("a")[0]
    with pytest.raises(KeyError, match="nosuchtoken"):
        trained.token_to_id("nosuchtoken")


def test_vocab_sizes(trained):
    assert trained.vocab_size == VOCAB_SIZE
    assert trained.padded_vocab_size == 896


def test_training_compresses_unseen_text_and_is_deterministic(trained, corpus):
    unseen = "".join(corpus[TRAIN_TOPICS:])
    assert len(trained.encode(unseen)) < 0.5 * len(unseen.encode())
    assert GLMTokenizer.train(corpus[:TRAIN_TOPICS], VOCAB_SIZE).sha256 == trained.sha256
    assert GLMTokenizer.train(corpus[:TRAIN_TOPICS - 1], VOCAB_SIZE).sha256 != trained.sha256


def test_training_rejects_a_vocabulary_smaller_than_the_alphabet():
    with pytest.raises(ValueError, match="vocab_size"):
        GLMTokenizer.train(["some text"], 100)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_round_trips(trained, text):
    assert trained.decode(trained.encode(text)) == text


def test_corpus_round_trips(trained, corpus):
    assert trained.decode_batch(trained.encode_batch(corpus)) == corpus


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(), max_size=6))
def test_encode_batch_matches_encode(trained, texts):
    assert trained.encode_batch(texts) == [trained.encode(text) for text in texts]


@pytest.mark.parametrize("role", list(SPECIAL_TOKENS))
def test_special_tokens_are_never_split(trained, role):
    token_id = getattr(trained.special_ids, role)
    text = SPECIAL_TOKENS[role]
    assert trained.encode(text) == [token_id]
    ids = trained.encode(f"a{text}b {text}.")
    assert ids.count(token_id) == 2
    assert trained.decode(ids) == f"a{text}b {text}."
    assert trained.decode(ids, skip_special_tokens=True) == "ab ."


def test_save_and_load_give_identical_encodings(trained, corpus, tmp_path):
    trained.save(tmp_path / "nested" / "tokenizer.json")
    loaded = GLMTokenizer.from_file(tmp_path / "nested" / "tokenizer.json")
    assert loaded.special_ids == trained.special_ids
    assert loaded.sha256 == trained.sha256
    assert loaded.encode_batch(corpus) == trained.encode_batch(corpus)


def test_from_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        GLMTokenizer.from_file(tmp_path / "missing.json")
    plain = Tokenizer(models.BPE())
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        GLMTokenizer.from_file(tmp_path / "plain.json")


def test_gpt2_files_give_the_authors_ids(gpt2):
    assert gpt2.special_ids == GPT2_IDS
    assert gpt2.vocab_size == 50265
    assert gpt2.padded_vocab_size == 50304
    names = {"[pad]": 50256, "<eos>": 50256, "<sop>": 50257, "<eop>": 50258, "[CLS]": 50259,
             "[MASK]": 50260, "[SEP]": 50261, "[UNK]": 50262, "[gMASK]": 50263, "[sMASK]": 50264}
    assert {name: gpt2.token_to_id(name) for name in names} == names


def test_gpt2_files_apply_the_merges_and_round_trip(gpt2, gpt2_files):
    vocab = gpt2_files[2]
    assert gpt2.encode(" the") == [vocab["Ġthe"]]
    assert gpt2.encode("he?!") == [vocab["he"], vocab["?!"]]
    text = "[CLS] the cat[MASK] sat.<|endoftext|>\n<|startofpiece|> ünïcødé 🎉<|endofpiece|>[gMASK][sMASK]"
    ids = gpt2.encode(text)
    assert {50256, 50257, 50258, 50259, 50260, 50263, 50264} <= set(ids)
    assert gpt2.decode(ids) == text
    assert gpt2.decode(ids, skip_special_tokens=True) == " the cat sat.\n ünïcødé 🎉"


def test_gpt2_files_errors_name_the_problem(gpt2_files, tmp_path):
    vocab_file, merges_file, vocab = gpt2_files
    with pytest.raises(FileNotFoundError, match="merges_file"):
        GLMTokenizer.from_gpt2_files(vocab_file, tmp_path / "merges.txt")
    del vocab["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="endoftext"):
        GLMTokenizer.from_gpt2_files(tmp_path / "vocab.json", merges_file)


def test_sentence_end_ids(trained):
    ends = trained.sentence_end_ids
    assert ends.dtype == torch.int64
    assert torch.equal(ends, torch.unique(ends))  # sorted, no repeats
    ends = set(ends.tolist())
    for punctuation in (".", "?", "!", ";", ":", "\n"):
        assert trained.encode(punctuation)[0] in ends, punctuation
    for text in ("a", " the", ",", ")", " "):
        assert trained.encode(text)[0] not in ends, text
    assert not ends & set(vars(trained.special_ids).values())
    assert any(len(trained.decode([i])) > 1 for i in ends)  # merged tokens such as ".\n" count too


def test_sentence_end_ids_of_gpt2_files(gpt2, gpt2_files):
    vocab = gpt2_files[2]
    ends = set(gpt2.sentence_end_ids.tolist())
    assert {vocab["."], vocab["Ċ"], vocab["?!"]} <= ends
    assert not {vocab["Ġthe"], vocab["he"], 50256, 50259} & ends
