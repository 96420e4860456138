"""glm_ext.tokenizer: GLM's special tokens on a trained byte-level BPE, and the authors' tokenizers
(GPT-2 and RoBERTa BPE, BERT WordPiece, the Chinese SentencePiece model) with the authors' ids."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from glm_ext.data.corpus import default_corpus
from glm_ext.model import PRESETS, pad_vocab_size
from glm_ext.tokenizer import (
    PRESET_TOKENIZER_FAMILIES,
    SPEC_NAMES,
    SPECIAL_TOKENS,
    TOKENIZER_FAMILIES,
    GLMTokenizer,
    SpecialIds,
)
from tokenizer_files import WORDPIECE_TOKENS, train_sentencepiece, write_bpe_files, write_wordpiece_vocab

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


def test_trained_wordpiece_has_glm_base_layout_and_whole_words(corpus):
    tokenizer = GLMTokenizer.train_wordpiece(corpus[:TRAIN_TOPICS], 1000)
    n = tokenizer.vocab_size - 4  # the learnt pieces; then GLM's block and task tokens
    assert tokenizer.vocab_size == 1000
    assert GLMTokenizer.train_wordpiece(corpus[:TRAIN_TOPICS], 5000).vocab_size < 5000  # all frequent words fit
    assert tokenizer.special_ids == SpecialIds(pad=0, eos=0, cls=1, sep=2, mask=3, unk=4, sop=n, eop=n + 1,
                                               gmask=n + 2, smask=n + 3)
    ids = tokenizer.encode("The Statement is Executed.")
    assert [tokenizer.decode([i]) for i in ids] == ["the", "statement", "is", "executed", "."]  # one token a word
    assert tokenizer.decode(tokenizer.encode("Hello [MASK] world")) == "hello [MASK] world"
    assert GLMTokenizer.train_wordpiece(corpus[:TRAIN_TOPICS], 1000).sha256 == tokenizer.sha256
    with pytest.raises(ValueError, match="vocab_size"):
        GLMTokenizer.train_wordpiece(["some text"], 20)


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


def test_gpt2_mask_tokens_absorb_the_whitespace_before_them(gpt2, gpt2_files):
    vocab = gpt2_files[2]
    assert gpt2.encode("a [MASK]") == [vocab["a"], 50260]  # the authors' lstrip: no "Ġ" before the mask
    assert gpt2.encode("a \n [gMASK] [sMASK]") == [vocab["a"], 50263, 50264]
    assert gpt2.encode("a [CLS]") == [vocab["a"], vocab["Ġ"], 50259]  # other special tokens do not


# ---------------------------------------------------------------------------------------------
# BERT WordPiece (GLM-Base, GLM-Large, GLM-410M, GLM-515M)

WP = {token: i for i, token in enumerate(WORDPIECE_TOKENS)}
N_WP = len(WORDPIECE_TOKENS)


@pytest.fixture(scope="module")
def wordpiece_file(tmp_path_factory):
    return write_wordpiece_vocab(tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="module")
def wordpiece(wordpiece_file) -> GLMTokenizer:
    return GLMTokenizer.from_wordpiece_file(wordpiece_file)


def ids(*tokens):
    return [WP[token] for token in tokens]


def test_wordpiece_special_ids_follow_the_vocabulary_in_the_authors_order(wordpiece):
    # BERT's own tokens keep their ids ([PAD] is also eos); sop, eop, gMASK, sMASK follow the vocabulary.
    assert wordpiece.special_ids == SpecialIds(
        pad=WP["[PAD]"], eos=WP["[PAD]"], cls=WP["[CLS]"], sep=WP["[SEP]"], mask=WP["[MASK]"], unk=WP["[UNK]"],
        sop=N_WP, eop=N_WP + 1, gmask=N_WP + 2, smask=N_WP + 3)
    assert wordpiece.vocab_size == N_WP + 4
    assert wordpiece.encode("<|startofpiece|>[gMASK]<|endofpiece|>[sMASK][SEP]") == \
        [N_WP, N_WP + 2, N_WP + 1, N_WP + 3, WP["[SEP]"]]


def test_wordpiece_basic_tokenisation_and_continuations(wordpiece):
    assert wordpiece.encode("Hello, WORLD!") == ids("hello", ",", "world", "!")
    assert wordpiece.encode("The cat's  unaffable.") == ids("the", "cat", "'", "s", "un", "##aff", "##able", ".")
    assert wordpiece.encode("NAÏVE café") == ids("naive", "cafe")  # lowercased, accents stripped
    assert wordpiece.encode("北京is") == ids("北", "京", "is")  # CJK characters are words of their own
    assert wordpiece.encode("abb a") == ids("a", "##b", "##b", "a")
    assert wordpiece.encode("hel\x07lo\tworld\n") == ids("hello", "world")  # control characters dropped


def test_wordpiece_unknown_words(wordpiece):
    unk = WP["[UNK]"]
    assert wordpiece.encode("dog") == [unk]
    assert wordpiece.encode("unaffablex the") == [unk, WP["the"]]  # a word that cannot be split whole is [UNK]
    assert wordpiece.encode("a" + "b" * 99) == ids("a", *["##b"] * 99)  # 100 characters: still split
    assert wordpiece.encode("a" + "b" * 100) == [unk]  # longer words are [UNK]


def test_wordpiece_special_tokens_in_text(wordpiece):
    assert wordpiece.encode("the [MASK] sat on the[MASK]mat") == \
        ids("the", "[MASK]", "sat", "on", "the", "[MASK]", "mat")
    assert wordpiece.encode("[CLS] a [SEP] [PAD] [UNK]") == ids("[CLS]", "a", "[SEP]", "[PAD]", "[UNK]")
    assert wordpiece.encode("[mask]") == [WP["["], WP["[UNK]"], WP["]"]]  # spellings are case-sensitive


def test_wordpiece_cased(wordpiece_file):
    cased = GLMTokenizer.from_wordpiece_file(wordpiece_file, lowercase=False)
    assert cased.special_ids == GLMTokenizer.from_wordpiece_file(wordpiece_file).special_ids
    assert cased.encode("Hello hello Naïve naive") == ids("Hello", "hello", "Naïve", "naive")
    assert cased.encode("WORLD naïve") == ids("[UNK]", "[UNK]")
    assert cased.sha256 != GLMTokenizer.from_wordpiece_file(wordpiece_file).sha256


def test_wordpiece_decoding_joins_continuations(wordpiece):
    assert wordpiece.decode(ids("hello", ",", "un", "##aff", "##able", "cat", "!")) == "hello , unaffable cat !"
    with_specials = ids("[CLS]", "the", "[MASK]", "sat") + [N_WP]
    assert wordpiece.decode(with_specials) == "[CLS] the [MASK] sat <|startofpiece|>"
    assert wordpiece.decode(with_specials, skip_special_tokens=True) == "the sat"


def bert_reference(text: str, lowercase: bool = True) -> list[int]:
    """BERT's tokenisation written from its description (google-research/bert tokenization.py):
    clean, separate CJK, split on whitespace, lowercase and strip accents, split punctuation,
    then greedy longest-match WordPiece with ## continuations."""
    def punctuation(c):
        return 33 <= ord(c) <= 47 or 58 <= ord(c) <= 64 or 91 <= ord(c) <= 96 or 123 <= ord(c) <= 126 \
            or unicodedata.category(c).startswith("P")

    cleaned = ""
    for c in text:
        if c in " \t\n\r" or unicodedata.category(c) == "Zs":
            cleaned += " "
        elif not (ord(c) in (0, 0xFFFD) or unicodedata.category(c).startswith("C")):
            cleaned += f" {c} " if 0x4E00 <= ord(c) <= 0x9FFF else c
    words = []
    for word in cleaned.split():
        if lowercase:
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        for c in word:
            if punctuation(c):
                words += [c, ""]
            elif words and words[-1] != "" and not punctuation(words[-1][-1]):
                words[-1] += c
            else:
                words.append(c)
        words.append("")
    result = []
    for word in filter(None, words):
        pieces, start = [], 0
        while start < len(word) and len(word) <= 100:
            end = len(word)
            while end > start and ("##" if start else "") + word[start:end] not in WP:
                end -= 1
            if end == start:
                break
            pieces.append(WP[("##" if start else "") + word[start:end]])
            start = end
        result += pieces if start == len(word) else [WP["[UNK]"]]
    return result


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="aAbBsStThHeE, .!'[]\n\t\x00\x07\u00a0\u0301éÉïÏ北京«»-", max_size=30))
def test_wordpiece_matches_a_reference_written_from_bert(wordpiece_file, text):
    for lowercase in (True, False):
        tokenizer = GLMTokenizer.from_wordpiece_file(wordpiece_file, lowercase=lowercase)
        assert tokenizer.encode(text) == bert_reference(text, lowercase)


def test_wordpiece_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab_file"):
        GLMTokenizer.from_wordpiece_file(tmp_path / "vocab.txt")
    path = write_wordpiece_vocab(tmp_path, [t for t in WORDPIECE_TOKENS if t != "[MASK]"])
    with pytest.raises(ValueError, match=r"lacks BERT's special tokens \['\[MASK\]'\]"):
        GLMTokenizer.from_wordpiece_file(path)
    path = write_wordpiece_vocab(tmp_path, WORDPIECE_TOKENS + ["the"])
    with pytest.raises(ValueError, match="repeats tokens"):
        GLMTokenizer.from_wordpiece_file(path)


# ---------------------------------------------------------------------------------------------
# RoBERTa BPE (GLM-RoBERTa-Large)


@pytest.fixture(scope="module")
def roberta_files(tmp_path_factory):
    return write_bpe_files(tmp_path_factory.mktemp("roberta"), roberta=True)


@pytest.fixture(scope="module")
def roberta(roberta_files) -> GLMTokenizer:
    return GLMTokenizer.from_roberta_files(*roberta_files[:2])


def test_roberta_special_ids_are_the_authors(roberta, roberta_files):
    vocab = roberta_files[2]
    n = len(vocab)
    assert vocab["<mask>"] == n - 1
    # <s> is [CLS]; </s> is pad, eos and sep; <unk> and <mask> as RoBERTa has them; then sop, eop, gMASK, sMASK.
    assert roberta.special_ids == SpecialIds(pad=2, eos=2, sep=2, cls=0, unk=3, mask=n - 1,
                                             sop=n, eop=n + 1, gmask=n + 2, smask=n + 3)
    assert roberta.vocab_size == n + 4


def test_roberta_encodes_byte_level_bpe_and_the_authors_spellings(roberta, roberta_files):
    vocab = roberta_files[2]
    mask = vocab["<mask>"]
    assert roberta.encode(" the cat") == [vocab["Ġthe"], vocab["Ġcat"]]
    assert roberta.encode("he?!") == [vocab["he"], vocab["?!"]]
    assert roberta.encode("a [MASK] the") == [vocab["a"], mask, vocab["Ġthe"]]  # the mask absorbs the space
    assert roberta.encode("[CLS]x[SEP]y<|endoftext|>[UNK]") == [0, vocab["x"], 2, vocab["y"], 2, 3]
    # RoBERTa's own spellings and GPT-2's <|endoftext|> entry are plain text / never produced.
    assert roberta.encode("<s>") == [vocab["<"], vocab["s"], vocab[">"]]
    assert vocab["<|endoftext|>"] not in roberta.encode("<|endoftext|> <mask> </s>")
    text = "[CLS] the cat[MASK] sat.<|endoftext|>\n<|startofpiece|> ünïcødé 🎉<|endofpiece|>[gMASK][sMASK]"
    assert roberta.decode(roberta.encode(text)) == text
    assert roberta.decode(roberta.encode(text), skip_special_tokens=True) == " the cat sat.\n ünïcødé 🎉"


def test_roberta_and_gpt2_files_are_told_apart(roberta_files, tmp_path):
    with pytest.raises(ValueError, match="from_roberta_files"):
        GLMTokenizer.from_gpt2_files(*roberta_files[:2])
    gpt2_vocab, gpt2_merges, _ = write_bpe_files(tmp_path, roberta=False)
    with pytest.raises(ValueError, match=r"lacks RoBERTa's special tokens \['<s>', '</s>', '<unk>', '<mask>'\]"):
        GLMTokenizer.from_roberta_files(gpt2_vocab, gpt2_merges)
    with pytest.raises(FileNotFoundError, match="merges_file"):
        GLMTokenizer.from_roberta_files(roberta_files[0], tmp_path / "missing-merges.txt")
    (tmp_path / "broken.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="not a BPE vocab.json"):
        GLMTokenizer.from_roberta_files(tmp_path / "broken.json", roberta_files[1])


# ---------------------------------------------------------------------------------------------
# The Chinese SentencePiece model (GLM-Large-Chinese, GLM-10B-Chinese)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, corpus):
    pytest.importorskip("sentencepiece")  # an optional dependency (in requirements-dev.txt)
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), corpus[:20])


@pytest.fixture(scope="module")
def sp(sp_model):
    """The trained model read by the sentencepiece package itself: the reference for text ids."""
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(sp_model))


@pytest.fixture(scope="module")
def chinese(sp_model) -> GLMTokenizer:
    return GLMTokenizer.from_sentencepiece_file(sp_model)


def test_sentencepiece_special_ids_are_the_authors(chinese, sp, sp_model):
    n = sp.get_piece_size()
    # ChineseSPTokenizer: N+5 is skipped; --fix-command-token puts sMASK before gMASK after eop.
    assert chinese.special_ids == SpecialIds(pad=n, eos=n, sep=n + 1, cls=n + 2, mask=n + 3, unk=n + 4,
                                             sop=n + 6, eop=n + 7, smask=n + 8, gmask=n + 9)
    assert chinese.vocab_size == n + 10
    ten_b = GLMTokenizer.from_sentencepiece_file(sp_model, fix_command_token=False)
    # GLM-10B-Chinese, trained without --fix-command-token: gMASK takes eop's id.
    assert ten_b.special_ids == SpecialIds(pad=n, eos=n, sep=n + 1, cls=n + 2, mask=n + 3, unk=n + 4,
                                           sop=n + 6, eop=n + 7, gmask=n + 7, smask=n + 8)
    assert ten_b.vocab_size == n + 9
    assert ten_b.encode("[gMASK]<|endofpiece|>") == [n + 7, n + 7]
    assert ten_b.decode([n + 7]) == "[gMASK]"  # as the authors decode it
    assert ten_b.sha256 != chinese.sha256


def test_sentencepiece_encodes_the_pieces_between_special_tokens(chinese, sp):
    n = sp.get_piece_size()
    assert chinese.encode("清华大学位于[MASK]。") == sp.encode("清华大学位于") + [n + 3] + sp.encode("。")
    assert chinese.encode("Hello  [sMASK] world") == sp.encode("Hello") + [n + 8] + sp.encode(" world")
    assert chinese.encode("[CLS]北京[SEP]<|endoftext|>") == [n + 2, *sp.encode("北京"), n + 1, n]
    assert chinese.encode(" [gMASK]") == [n + 9]
    assert chinese.encode("a [CLS]") == sp.encode("a ") + [n + 2]  # only the masks absorb whitespace


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="清华大学北京中国你好，。！ abcHelo\n.é", max_size=30))
def test_sentencepiece_plain_text_is_sentencepieces(chinese, sp, text):
    assert chinese.encode(text) == sp.encode(text)
    assert chinese.decode(chinese.encode(text)) == sp.decode(sp.encode(text))
    assert chinese.encode_batch([text, text + "[MASK]"]) == [chinese.encode(text), chinese.encode(text + "[MASK]")]


def test_sentencepiece_decoding_restores_spaces_and_writes_special_tokens(chinese, sp):
    n = sp.get_piece_size()
    assert chinese.decode(sp.encode("hello world")) == "hello world"
    ids = [n + 2, *sp.encode("北京"), n + 3, *sp.encode("大学"), n + 6, n + 5, 10**6]  # N+5 and beyond: no tokens
    assert chinese.decode(ids) == "[CLS]北京[MASK]大学<|startofpiece|>"
    # Without the special tokens the text ids form one run (the dummy prefix of "大学" becomes a space).
    assert chinese.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode("北京") + sp.encode("大学"))
    assert chinese.token_to_id("北京") == sp.piece_to_id("北京")
    with pytest.raises(KeyError):
        chinese.token_to_id("not a piece")
    ends = set(chinese.sentence_end_ids.tolist())
    assert sp.piece_to_id("。") in ends and sp.piece_to_id("北京") not in ends  # Chinese punctuation ends sentences


def test_sentencepiece_save_and_load_keep_every_id(chinese, corpus, tmp_path):
    chinese.save(tmp_path / "tokenizer.json")
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["glm_ext.sentencepiece"] == 1 and len(saved["special_tokens"]) == 9
    loaded = GLMTokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.special_ids == chinese.special_ids and loaded.vocab_size == chinese.vocab_size
    assert loaded.sha256 == chinese.sha256
    texts = corpus[:5] + ["清华大学位于[MASK]，是中国的[gMASK]"]
    assert loaded.encode_batch(texts) == chinese.encode_batch(texts)


def test_sentencepiece_errors_name_the_problem(tmp_path):
    pytest.importorskip("sentencepiece")
    with pytest.raises(FileNotFoundError, match="model_file"):
        GLMTokenizer.from_sentencepiece_file(tmp_path / "cog-pretrain.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        GLMTokenizer.from_sentencepiece_file(tmp_path / "bad.model")
    (tmp_path / "bad.json").write_text('{"glm_ext.sentencepiece": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="malformed"):
        GLMTokenizer.from_file(tmp_path / "bad.json")
    (tmp_path / "notjson.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not JSON"):
        GLMTokenizer.from_file(tmp_path / "notjson.json")


# ---------------------------------------------------------------------------------------------
# Every family: saving, families by name, the released models' vocabulary sizes


@pytest.mark.parametrize("family", ["wordpiece", "roberta", "gpt2"])
def test_save_and_load_keep_every_id(family, wordpiece, roberta, gpt2, corpus, tmp_path):
    tokenizer = {"wordpiece": wordpiece, "roberta": roberta, "gpt2": gpt2}[family]
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = GLMTokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.special_ids == tokenizer.special_ids and loaded.vocab_size == tokenizer.vocab_size
    assert loaded.sha256 == tokenizer.sha256
    texts = corpus[:5] + ["a [MASK] b [sMASK]\n[gMASK] [SEP] <|endoftext|> [CLS] [UNK] [PAD]"]
    assert loaded.encode_batch(texts) == tokenizer.encode_batch(texts)
    assert loaded.decode_batch(tokenizer.encode_batch(texts)) == tokenizer.decode_batch(tokenizer.encode_batch(texts))


def test_families_by_name(wordpiece_file, roberta_files, sp_model, wordpiece, roberta, chinese, tmp_path):
    assert GLMTokenizer.from_files("wordpiece", [wordpiece_file]).sha256 == wordpiece.sha256
    assert GLMTokenizer.from_files("roberta", roberta_files[:2]).sha256 == roberta.sha256
    assert GLMTokenizer.from_files("chinese-sp", [sp_model]).sha256 == chinese.sha256
    assert GLMTokenizer.from_files("chinese-sp-10b", [sp_model]).special_ids.gmask == chinese.special_ids.eop
    assert GLMTokenizer.from_files("wordpiece-cased", [wordpiece_file]).encode("Hello") == [WP["Hello"]]
    with pytest.raises(ValueError, match=r"built from 2 file\(s\) \(vocab.json merges.txt\), got 1"):
        GLMTokenizer.from_files("roberta", roberta_files[:1])
    with pytest.raises(ValueError, match="unknown tokenizer family 'bert'"):
        GLMTokenizer.from_files("bert", [wordpiece_file])


def test_every_released_preset_has_a_family_whose_full_vocabulary_fills_its_embedding():
    assert set(PRESET_TOKENIZER_FAMILIES) == set(PRESETS) - {"tiny"}
    assert set(PRESET_TOKENIZER_FAMILIES.values()) <= set(TOKENIZER_FAMILIES)
    # The released files' sizes plus what the authors appended: BERT 30522 + 4, RoBERTa 50265 + 4,
    # GPT-2 50257 + 8, cog-pretrain 50000 + 10 (+ 9 without --fix-command-token).
    full_size = {"wordpiece": 30526, "roberta": 50269, "gpt2": 50265, "chinese-sp": 50010, "chinese-sp-10b": 50009}
    for preset, family in PRESET_TOKENIZER_FAMILIES.items():
        assert pad_vocab_size(full_size[family]) == PRESETS[preset]["vocab_size"], preset
