"""Small tokenizer files of every family the authors used, written in the test (no downloads), for
test_tokenizer.py and the convert/generate tests of test_checkpoint.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tokenizers import pre_tokenizers

#: A BERT-shaped vocab.txt: BERT's specials (not at BERT's ids, so that ids come from the file),
#: whole words, ``##`` continuations, punctuation, CJK characters, cased words.
WORDPIECE_TOKENS = [
    "[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "the", "cat", "sat", "un", "##aff", "##able", "hello", "world", "naive", "cafe",
    ",", ".", "!", "'", "[", "]", "s", "a", "##b", "北", "京", "Hello", "Naïve", "is", "on", "mat",
]

#: Merges shared by the GPT-2- and RoBERTa-shaped files.
BPE_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("?", "!"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]

#: The Chinese SentencePiece model is trained on these lines (and English text) in the test.
CHINESE_LINES = [
    "清华大学位于北京，是中国的一所大学。",
    "今天天气很好，我们去公园散步吧！",
    "北京是中国的首都，也是一座历史悠久的城市。",
    "大学的图书馆里有很多书。",
    "你好，世界！这是一个测试。",
]


def write_wordpiece_vocab(folder: Path, tokens=WORDPIECE_TOKENS) -> Path:
    path = folder / "vocab.txt"
    path.write_text("".join(token + "\n" for token in tokens), encoding="utf-8")
    return path


def write_bpe_files(folder: Path, *, roberta: bool) -> tuple[Path, Path, dict[str, int]]:
    """vocab.json and merges.txt of a byte-level BPE: RoBERTa-shaped (``<s> <pad> </s> <unk>`` first,
    GPT-2's ``<|endoftext|>`` inside, ``<mask>`` last) or GPT-2-shaped (``<|endoftext|>`` last)."""
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] if roberta else []
    tokens += sorted(pre_tokenizers.ByteLevel.alphabet()) + [left + right for left, right in BPE_MERGES]
    tokens += ["<|endoftext|>", "<mask>"] if roberta else ["<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = "".join(f"{left} {right}\n" for left, right in BPE_MERGES)
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt", vocab


def train_sentencepiece(folder: Path, english: list[str], vocab_size: int = 400) -> Path:
    """A BPE SentencePiece model (as cog-pretrain.model is) trained on Chinese and English lines."""
    import sentencepiece

    lines = CHINESE_LINES * 20 + [line for text in english for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    path = folder / "cog-pretrain.model"
    path.write_bytes(model.getvalue())
    return path
