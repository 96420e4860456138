"""GLM's tokenizer: the text tokenizers of the authors' checkpoints, with GLM's special tokens at the
authors' ids.

Ways to get one:

- :meth:`GLMTokenizer.train` learns a byte-level BPE on texts. The ten special tokens take ids 0..9 in
  GLM_SPEC section 4 order (``[pad]`` first), so small trained vocabularies have stable small ids.
- From the files the authors' checkpoints were trained with, giving the authors' ids for text and
  special tokens (THUDM/GLM ``data_utils/tokenization.py``; N is the size of the files' vocabulary):

  * :meth:`GLMTokenizer.from_wordpiece_file`: BERT's ``vocab.txt`` (GLM-Base, -Large, -410M, -515M).
    BERT's ``[PAD]`` (also eos), ``[CLS]``, ``[SEP]``, ``[MASK]``, ``[UNK]``; then ``<|startofpiece|>``
    N, ``<|endofpiece|>`` N+1, ``[gMASK]`` N+2, ``[sMASK]`` N+3.
  * :meth:`GLMTokenizer.from_roberta_files`: RoBERTa's ``vocab.json`` and ``merges.txt``
    (GLM-RoBERTa-Large). ``<s>`` is ``[CLS]``, ``</s>`` pad, eos and sep, ``<unk>`` ``[UNK]``,
    ``<mask>`` ``[MASK]``; then ``<|startofpiece|>`` N ... ``[sMASK]`` N+3 as for BERT.
  * :meth:`GLMTokenizer.from_gpt2_files`: GPT-2's ``vocab.json`` and ``merges.txt`` (GLM-2B, GLM-10B).
    ``<|endoftext|>`` 50256 (pad and eos), then ``<|startofpiece|>`` 50257, ``<|endofpiece|>``,
    ``[CLS]``, ``[MASK]``, ``[SEP]``, ``[UNK]``, ``[gMASK]``, ``[sMASK]`` 50264.
  * :meth:`GLMTokenizer.from_sentencepiece_file`: ``cog-pretrain.model`` (GLM-Large-Chinese,
    GLM-10B-Chinese). ``<|endoftext|>`` N (pad and eos), ``[SEP]`` N+1, ``[CLS]`` N+2, ``[MASK]`` N+3,
    ``[UNK]`` N+4, ``<|startofpiece|>`` N+6, ``<|endofpiece|>`` N+7, ``[sMASK]`` N+8, ``[gMASK]`` N+9;
    GLM-10B-Chinese (trained without the authors' ``--fix-command-token``) has ``[gMASK]`` N+7, the id
    of ``<|endofpiece|>``, and ``[sMASK]`` N+8.

  GLM-Base, -Large and -RoBERTa-Large were trained without task masks: there the ``[gMASK]`` and
  ``[sMASK]`` rows are untrained padding. :data:`PRESET_TOKENIZER_FAMILIES` names each released
  model's family and :meth:`GLMTokenizer.from_files` builds one by family name.
- :meth:`GLMTokenizer.from_file` loads a file written by :meth:`GLMTokenizer.save`.

In text, the special tokens are written with the authors' spellings (``<|startofpiece|>`` for
``<sop>`` and so on, see :data:`SPECIAL_TOKENS`); they are never split by encoding, and decoding keeps
them unless asked not to. With the authors' files, a mask token absorbs the whitespace before it, as
the authors' ``lstrip`` command tokens do (``"a [MASK]"`` encodes as ``"a"``, ``[MASK]``). Roles that
share an id share a spelling: a tokenizer without ``[PAD]`` pads with ``<|endoftext|>`` (GPT-2,
RoBERTa, Chinese), one without ``<|endoftext|>`` ends documents with ``[PAD]`` (BERT) and one without
``[SEP]`` separates with ``<|endoftext|>`` (RoBERTa). So RoBERTa's own specials are renamed to GLM's
spellings (``<s>`` is ``[CLS]``, ``</s>`` is ``<|endoftext|>``, ``<unk>`` is ``[UNK]``, ``<mask>`` is
``[MASK]``); RoBERTa's ``[SEP]`` in text encodes as ``</s>``, as the authors' did.

Saved form (:meth:`GLMTokenizer.save`, conventionally ``tokenizer.json``): one JSON file. For the
families built on the ``tokenizers`` package it is that package's ``tokenizer.json``, holding the
special tokens as added tokens. A SentencePiece model cannot be expressed exactly as one, so the
Chinese tokenizer is saved as ``{"glm_ext.sentencepiece": 1, "model": <the .model file, base64>,
"special_tokens": [{"content": ..., "id": ..., "lstrip": ...}, ...]}`` (see
:class:`SentencePieceTokenizer`; it needs the optional ``sentencepiece`` package). :attr:`sha256`
fingerprints the whole saved form of every family.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from glm_ext.files import write_file_atomically

#: Role -> the token's text (the authors' texts), in GLM_SPEC section 4 order, which is also the order
#: of ids 0..9 in a trained tokenizer.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "[PAD]",
    "eos": "<|endoftext|>",
    "cls": "[CLS]",
    "sep": "[SEP]",
    "mask": "[MASK]",
    "smask": "[sMASK]",
    "gmask": "[gMASK]",
    "sop": "<|startofpiece|>",
    "eop": "<|endofpiece|>",
    "unk": "[UNK]",
}

#: GLM_SPEC section 4 name -> role; :meth:`GLMTokenizer.token_to_id` accepts these names.
SPEC_NAMES: dict[str, str] = {
    "[pad]": "pad",
    "<eos>": "eos",
    "[CLS]": "cls",
    "[SEP]": "sep",
    "[MASK]": "mask",
    "[sMASK]": "smask",
    "[gMASK]": "gmask",
    "<sop>": "sop",
    "<eop>": "eop",
    "[UNK]": "unk",
}

#: A role without a token of its own spelling takes the id of another role (see the module docstring).
_SHARED_ROLES = (("pad", "eos"), ("eos", "pad"), ("sep", "eos"))

#: The authors' mask tokens absorb the whitespace before them (their CommandTokens' ``lstrip``).
_LSTRIP_ROLES = ("mask", "smask", "gmask")

#: The roles the authors appended after GPT-2's 50257 tokens, in the order that gives ids 50257..50264.
_GPT2_APPENDED_ROLES = ("sop", "eop", "cls", "mask", "sep", "unk", "gmask", "smask")

#: The roles the authors appended after BERT's and RoBERTa's vocabularies (task masks included).
_BLOCK_ROLES = ("sop", "eop", "gmask", "smask")

#: The roles of BERT's own special tokens, which have GLM's spellings (``[PAD]`` is also eos).
_BERT_ROLES = ("pad", "cls", "sep", "mask", "unk")

#: RoBERTa's special tokens -> the roles the authors gave them.
_ROBERTA_ROLES = {"<s>": "cls", "</s>": "eos", "<unk>": "unk", "<mask>": "mask"}

#: The tokenizer families of the authors' checkpoints (``glm-ext convert --tokenizer-family``): the
#: files each is built from, in the order :meth:`GLMTokenizer.from_files` takes them.
TOKENIZER_FAMILIES: dict[str, tuple[str, ...]] = {
    "wordpiece": ("vocab.txt",),
    "wordpiece-cased": ("vocab.txt",),
    "roberta": ("vocab.json", "merges.txt"),
    "gpt2": ("vocab.json", "merges.txt"),
    "chinese-sp": ("cog-pretrain.model",),
    "chinese-sp-10b": ("cog-pretrain.model",),
}

#: The family each released checkpoint was trained with, by its preset in ``glm_ext.model.PRESETS``
#: (THUDM/GLM ``config_tasks/model_blocklm_*.sh``; all their WordPiece models are uncased).
PRESET_TOKENIZER_FAMILIES: dict[str, str] = {
    "base": "wordpiece",
    "large": "wordpiece",
    "410m": "wordpiece",
    "515m": "wordpiece",
    "roberta-large": "roberta",
    "2b": "gpt2",
    "10b": "gpt2",
    "large-chinese": "chinese-sp",
    "10b-chinese": "chinese-sp-10b",
}

#: A token ends a sentence when its text contains one of these (THUDM/GLM ``blocklm_utils.py``
#: ``contains_sentence_end``, which pretraining used; it includes Chinese punctuation).
SENTENCE_END_CHARACTERS = (".", "?", "!", ";", ":", "\n", "。", "？", "！", "；", "…")

#: Embedding tables are padded to a multiple of this many rows (GLM_SPEC section 3).
VOCAB_PADDING_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids of GLM's special tokens, by role. Roles may share an id (``pad == eos`` with the
    authors' files; see the module docstring)."""

    pad: int
    eos: int
    cls: int
    sep: int
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    unk: int


class GLMTokenizer:
    """A text tokenizer plus the ids of GLM's special tokens.

    The text tokenizer is a ``tokenizers.Tokenizer`` or, for the Chinese SentencePiece model, a
    :class:`SentencePieceTokenizer` (which offers the part of its interface used here).

    Encoding never adds tokens of its own (no ``[CLS]``/``<eos>``): where those go is the data
    pipeline's decision (a document ends with ``<eos>``, a packed row starts with ``[CLS]``). For the
    same reason a loaded tokenizer's truncation and padding are switched off.
    """

    def __init__(self, tokenizer: Tokenizer | SentencePieceTokenizer) -> None:
        if isinstance(tokenizer, Tokenizer):
            tokenizer.no_truncation()
            tokenizer.no_padding()
        self._tokenizer = tokenizer
        self.special_ids = _find_special_ids(tokenizer)

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> GLMTokenizer:
        """Learn a byte-level BPE of ``vocab_size`` tokens (special tokens included) on ``texts``.

        The result depends only on the texts and arguments (the same input gives the same file).
        All 256 bytes are in the alphabet, so any text round-trips through encode/decode.
        """
        smallest = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
        if vocab_size < smallest:
            raise ValueError(f"vocab_size must be at least {smallest} (specials + 256 bytes), got {vocab_size}")
        tokenizer = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[_special(text) for text in SPECIAL_TOKENS.values()],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def from_gpt2_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike) -> GLMTokenizer:
        """GPT-2's ``vocab.json`` and ``merges.txt`` with the authors' special-token ids.

        ``<|endoftext|>`` (already in GPT-2's vocabulary) serves as eos and pad; the other special
        tokens are appended in the authors' order, which gives GLM_SPEC section 4's ids for GPT-2's
        own files (50257 entries).
        """
        vocab, merges = _read_bpe_files(vocab_file, merges_file)
        if SPECIAL_TOKENS["eos"] not in vocab:
            raise ValueError(f"vocab_file {os.fspath(vocab_file)!r} has no {SPECIAL_TOKENS['eos']!r} token")
        if all(token in vocab for token in _ROBERTA_ROLES):
            raise ValueError(f"vocab_file {os.fspath(vocab_file)!r} holds RoBERTa's special tokens: "
                             "use GLMTokenizer.from_roberta_files")
        tokenizer = _byte_level(models.BPE(vocab, merges))
        tokenizer.add_special_tokens([_authors_special(role) for role in ("eos", *_GPT2_APPENDED_ROLES)])
        return cls(tokenizer)

    @classmethod
    def from_roberta_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike) -> GLMTokenizer:
        """RoBERTa's ``vocab.json`` and ``merges.txt`` with the authors' ids (GLM-RoBERTa-Large).

        RoBERTa's ``<s>``, ``</s>``, ``<unk>`` and ``<mask>`` keep their ids under GLM's spellings
        (``</s>`` is pad, eos and sep); ``<|startofpiece|>``, ``<|endofpiece|>``, ``[gMASK]`` and
        ``[sMASK]`` are appended after the vocabulary.
        """
        vocab, merges = _read_bpe_files(vocab_file, merges_file)
        missing = [token for token in _ROBERTA_ROLES if token not in vocab]
        if missing:
            raise ValueError(f"vocab_file {os.fspath(vocab_file)!r} lacks RoBERTa's special tokens {missing} "
                             "(for GPT-2's files use GLMTokenizer.from_gpt2_files)")
        ids = {role: vocab.pop(token) for token, role in _ROBERTA_ROLES.items()}
        for role, token_id in ids.items():
            spelling = SPECIAL_TOKENS[role]
            if spelling in vocab:
                # RoBERTa also holds GPT-2's <|endoftext|>, which its BPE never produces and the authors
                # never encode (their <|endoftext|> is </s>): it keeps its id under another name.
                vocab[f"<unused:{spelling}>"] = vocab.pop(spelling)
            vocab[spelling] = token_id
        tokenizer = _byte_level(models.BPE(vocab, merges))
        # The authors' [SEP] is </s> as well: typed in text it is respelled <|endoftext|>, which is matched
        # after that normalisation (normalized=True).
        tokenizer.normalizer = normalizers.Replace(SPECIAL_TOKENS["sep"], SPECIAL_TOKENS["eos"])
        tokenizer.add_special_tokens(
            [_authors_special(role, normalized=role == "eos") for role in (*ids, *_BLOCK_ROLES)]
        )
        return cls(tokenizer)

    @classmethod
    def from_wordpiece_file(cls, vocab_file: str | os.PathLike, *, lowercase: bool = True) -> GLMTokenizer:
        """BERT's ``vocab.txt`` (one token per line) with the authors' ids (GLM-Base, -Large, -410M, -515M).

        BERT's tokenisation: control characters dropped, whitespace and punctuation split, CJK
        characters separated, then (``lowercase``, for uncased vocabularies) lowercased with accents
        stripped; words are split greedily into the longest pieces of the vocabulary (``##`` marks a
        continuation), and a word that cannot be split (or is longer than 100 characters) is
        ``[UNK]``. BERT's ``[PAD]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, ``[UNK]`` serve GLM under
        their own ids (``[PAD]`` also as eos); ``<|startofpiece|>``, ``<|endofpiece|>``,
        ``[gMASK]`` and ``[sMASK]`` are appended after the vocabulary. Decoding joins ``##`` pieces
        to their words and the words with single spaces.
        """
        _check_files(vocab_file=vocab_file)
        try:
            vocab = models.WordPiece.read_file(os.fspath(vocab_file))
        except Exception as exc:  # the tokenizers package raises plain Exceptions
            raise ValueError(f"vocab_file {os.fspath(vocab_file)!r} is not a WordPiece vocab.txt: {exc}") from exc
        missing = [SPECIAL_TOKENS[role] for role in _BERT_ROLES if SPECIAL_TOKENS[role] not in vocab]
        if missing:
            raise ValueError(f"vocab_file {os.fspath(vocab_file)!r} lacks BERT's special tokens {missing}")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError(
                f"vocab_file {os.fspath(vocab_file)!r} repeats tokens: its ids are not 0..{len(vocab) - 1}"
            )
        tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=SPECIAL_TOKENS["unk"], max_input_chars_per_word=100))
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
        )
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        tokenizer.add_special_tokens([_authors_special(role) for role in (*_BERT_ROLES, *_BLOCK_ROLES)])
        return cls(tokenizer)

    @classmethod
    def from_sentencepiece_file(cls, model_file: str | os.PathLike, *, fix_command_token: bool = True) -> GLMTokenizer:
        """The Chinese SentencePiece model (``cog-pretrain.model``) with the authors' ids.

        The special tokens follow the model's N pieces: ``<|endoftext|>`` (pad and eos) N, ``[SEP]``
        N+1, ``[CLS]`` N+2, ``[MASK]`` N+3, ``[UNK]`` N+4, ``<|startofpiece|>`` N+6,
        ``<|endofpiece|>`` N+7, then ``[sMASK]`` N+8 and ``[gMASK]`` N+9 as GLM-Large-Chinese was
        trained (the authors' ``--fix-command-token``); ``fix_command_token=False`` gives
        GLM-10B-Chinese's ``[gMASK]`` N+7 (the id of ``<|endofpiece|>``) and ``[sMASK]`` N+8. Text
        between special tokens is encoded by SentencePiece piece by piece, as the authors did;
        decoding turns ``▁`` back into spaces.
        """
        _check_files(model_file=model_file)
        return cls(SentencePieceTokenizer.chinese(Path(model_file).read_bytes(), fix_command_token=fix_command_token))

    @classmethod
    def from_files(cls, family: str, files: Sequence[str | os.PathLike]) -> GLMTokenizer:
        """The tokenizer of ``family`` (a key of :data:`TOKENIZER_FAMILIES`) from its files, in the
        order listed there (``vocab.json merges.txt`` for the BPE families)."""
        if family not in TOKENIZER_FAMILIES:
            raise ValueError(f"unknown tokenizer family {family!r}; choose one of {', '.join(TOKENIZER_FAMILIES)}")
        expected = TOKENIZER_FAMILIES[family]
        if len(files) != len(expected):
            raise ValueError(
                f"the {family} tokenizer is built from {len(expected)} file(s) ({' '.join(expected)}), "
                f"got {len(files)}: {' '.join(map(os.fspath, files)) or 'none'}"
            )
        builders = {
            "wordpiece": cls.from_wordpiece_file,
            "wordpiece-cased": lambda vocab: cls.from_wordpiece_file(vocab, lowercase=False),
            "roberta": cls.from_roberta_files,
            "gpt2": cls.from_gpt2_files,
            "chinese-sp": cls.from_sentencepiece_file,
            "chinese-sp-10b": lambda model: cls.from_sentencepiece_file(model, fix_command_token=False),
        }
        return builders[family](*files)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GLMTokenizer:
        """Load a file written by :meth:`save` (or any ``tokenizer.json`` that holds the special tokens
        under the authors' texts)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {os.fspath(path)!r} does not exist")
        text = Path(path).read_text(encoding="utf-8")
        try:
            content = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tokenizer file {os.fspath(path)!r} is not JSON: {exc}") from exc
        if isinstance(content, dict) and SentencePieceTokenizer.FORMAT in content:
            return cls(SentencePieceTokenizer.from_dict(content))
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as exc:  # the tokenizers package raises plain Exceptions
            raise ValueError(f"tokenizer file {os.fspath(path)!r} is not a saved tokenizer: {exc}") from exc
        return cls(tokenizer)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON file (see the module docstring) that :meth:`from_file` reads back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, lambda f: f.write(self._tokenizer.to_str()))

    # ----- encoding and decoding ----------------------------------------------------------------

    def encode(self, text: str, *, special_tokens_as_text: bool = False) -> list[int]:
        """Token ids of ``text``. With ``special_tokens_as_text`` the special tokens' texts in it
        (``[CLS]``, ``<|endofpiece|>``, ...) are encoded as plain text, not as control tokens."""
        if not special_tokens_as_text:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        self._tokenizer.encode_special_tokens = True
        try:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self._tokenizer.encode_special_tokens = False

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (in parallel, in the library's native code)."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = False) -> list[str]:
        return self._tokenizer.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    # ----- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """The number of token ids (special tokens included)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def padded_vocab_size(self) -> int:
        """``vocab_size`` rounded up to a multiple of 128: the rows of the model's word embedding."""
        return -(-self.vocab_size // VOCAB_PADDING_MULTIPLE) * VOCAB_PADDING_MULTIPLE

    def check_embedding_rows(self, rows: int) -> None:
        """Raises ValueError unless a word embedding of ``rows`` rows is this tokenizer's, padded as the
        authors pad (:attr:`padded_vocab_size`): what tells tokenizer files from another model's."""
        if rows != self.padded_vocab_size:
            raise ValueError(
                f"the tokenizer has {self.vocab_size} tokens ({self.padded_vocab_size} rows once padded to a "
                f"multiple of {VOCAB_PADDING_MULTIPLE}) but the checkpoint's word embedding has {rows} rows: "
                "the tokenizer files do not belong to this checkpoint"
            )

    def token_to_id(self, name: str) -> int:
        """The id of a GLM_SPEC section 4 name (``"<sop>"``, ``"[pad]"``, ...) or of any vocabulary token."""
        if name in SPEC_NAMES:
            return getattr(self.special_ids, SPEC_NAMES[name])
        token_id = self._tokenizer.token_to_id(name)
        if token_id is None:
            raise KeyError(f"{name!r} is neither a GLM special-token name nor a token of the vocabulary")
        return token_id

    @functools.cached_property
    def sentence_end_ids(self) -> torch.Tensor:
        """Sorted int64 ids of the tokens that end a sentence (what sentence-level masking splits at).

        The authors' rule: a token whose text contains one of :data:`SENTENCE_END_CHARACTERS`; the
        text is the token decoded on its own. Special tokens never count.
        """
        special = set(dataclasses.astuple(self.special_ids))
        ids = [i for i in range(self.vocab_size) if i not in special]
        texts = self.decode_batch([[i] for i in ids])
        ends = [i for i, text in zip(ids, texts) if any(c in text for c in SENTENCE_END_CHARACTERS)]
        return torch.tensor(ends, dtype=torch.int64)

    @functools.cached_property
    def sha256(self) -> str:
        """A fingerprint of the whole tokenizer, recorded in token files to catch mismatches."""
        return hashlib.sha256(self._tokenizer.to_str().encode()).hexdigest()


class SpecialToken(NamedTuple):
    """A special token of a :class:`SentencePieceTokenizer`: its text, id, and whether it absorbs the
    whitespace before it."""

    content: str
    id: int
    lstrip: bool = False


class SentencePieceEncoding(NamedTuple):
    ids: list[int]


class SentencePieceTokenizer:
    """A SentencePiece model plus special tokens, offering the part of ``tokenizers.Tokenizer``'s
    interface that :class:`GLMTokenizer` uses.

    Encoding splits the text at the special tokens' texts (a ``lstrip`` token takes the whitespace
    before it along) and encodes each piece between them with SentencePiece, as the authors'
    ``ChineseSPTokenizer`` does. Decoding decodes the runs of ordinary ids with SentencePiece and
    writes special tokens as their texts; ids that are neither are skipped. Several special tokens
    may share an id: the first one listed is the id's text. ``to_str`` is the saved form (see the
    module docstring). ``encode_special_tokens`` (as in ``tokenizers``): encode special tokens'
    texts as plain text.
    """

    FORMAT = "glm_ext.sentencepiece"
    VERSION = 1
    encode_special_tokens = False

    def __init__(self, model: bytes, special_tokens: Sequence[SpecialToken]) -> None:
        self._model = bytes(model)
        self._processor = _load_sentencepiece(self._model)
        self._special = tuple(SpecialToken(*token) for token in special_tokens)
        pieces = len(self._processor)
        if not self._special or any(token.id < pieces for token in self._special):
            raise ValueError(f"special tokens must follow the model's {pieces} pieces, got {self._special}")
        self._special_ids = {token.content: token.id for token in self._special}
        self._special_texts: dict[int, str] = {}
        for token in self._special:
            self._special_texts.setdefault(token.id, token.content)
        # Longest texts first, so that a special text containing another one wins.
        alternatives = sorted(self._special, key=lambda token: -len(token.content))
        self._splitter = re.compile(
            "(" + "|".join((r"\s*" if token.lstrip else "") + re.escape(token.content) for token in alternatives) + ")"
        )

    @classmethod
    def chinese(cls, model: bytes, *, fix_command_token: bool = True) -> SentencePieceTokenizer:
        """The authors' special tokens after the pieces of ``model`` (see
        :meth:`GLMTokenizer.from_sentencepiece_file`)."""
        n = len(_load_sentencepiece(model))
        ids = {"eos": n, "sep": n + 1, "cls": n + 2, "mask": n + 3, "unk": n + 4, "sop": n + 6, "eop": n + 7}
        ids.update({"smask": n + 8, "gmask": n + 9} if fix_command_token else {"gmask": n + 7, "smask": n + 8})
        # In SPECIAL_TOKENS order, so [gMASK] is the text of GLM-10B-Chinese's N+7, as in the authors' decoding.
        return cls(model, [SpecialToken(SPECIAL_TOKENS[role], ids[role], role in _LSTRIP_ROLES)
                           for role in SPECIAL_TOKENS if role in ids])

    # ----- the saved form -----------------------------------------------------------------------

    def to_str(self) -> str:
        return json.dumps({
            self.FORMAT: self.VERSION,
            "model": base64.b64encode(self._model).decode("ascii"),
            "special_tokens": [token._asdict() for token in self._special],
        })

    @classmethod
    def from_dict(cls, content: dict) -> SentencePieceTokenizer:
        if content[cls.FORMAT] != cls.VERSION:
            raise ValueError(f"unknown {cls.FORMAT} version {content[cls.FORMAT]!r} (this is version {cls.VERSION})")
        try:
            tokens = [SpecialToken(t["content"], t["id"], t["lstrip"]) for t in content["special_tokens"]]
            model = base64.b64decode(content["model"], validate=True)
        except (KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"malformed {cls.FORMAT} tokenizer: {exc!r}") from exc
        return cls(model, tokens)

    # ----- the tokenizers.Tokenizer interface ---------------------------------------------------

    # (add_special_tokens: there are none to add, as in GLMTokenizer's use of tokenizers.Tokenizer)
    def encode(self, text: str, add_special_tokens: bool = False) -> SentencePieceEncoding:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[SentencePieceEncoding]:
        splits = [[text] if self.encode_special_tokens else self._splitter.split(text) for text in texts]
        # re.split alternates text pieces (even indices) and matched special texts (odd indices).
        pieces = [piece for split in splits for piece in split[::2] if piece]
        encoded = iter(self._processor.encode(pieces))
        results = []
        for split in splits:
            ids: list[int] = []
            for index, piece in enumerate(split):
                if index % 2:
                    ids.append(self._special_ids[piece.lstrip()])
                elif piece:
                    ids.extend(next(encoded))
            results.append(SentencePieceEncoding(ids))
        return results

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.decode_batch([ids], skip_special_tokens)[0]

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        pieces = len(self._processor)
        texts = []
        for ids in batch:
            parts: list[str | list[int]] = [[]]
            for token_id in ids:
                if 0 <= token_id < pieces:
                    parts[-1].append(token_id)
                elif token_id in self._special_texts and not skip_special_tokens:
                    parts += [self._special_texts[token_id], []]
            texts.append("".join(part if isinstance(part, str) else self._processor.decode(part) for part in parts))
        return texts

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return max(token.id for token in self._special) + 1 if with_added_tokens else len(self._processor)

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_ids:
            return self._special_ids[token]
        token_id = self._processor.piece_to_id(token)
        return token_id if self._processor.id_to_piece(token_id) == token else None


def _load_sentencepiece(model: bytes):
    """A ``sentencepiece.SentencePieceProcessor`` of a ``.model`` file's bytes (the optional package is
    imported only here)."""
    try:
        import sentencepiece
    except ImportError as exc:
        raise ImportError(
            "the SentencePiece tokenizer needs the sentencepiece package: pip install 'glm_ext[sentencepiece]'"
        ) from exc
    try:
        return sentencepiece.SentencePieceProcessor(model_proto=model)
    except RuntimeError as exc:
        raise ValueError(f"not a SentencePiece model: {exc}") from exc


def _special(text: str, *, lstrip: bool = False, normalized: bool = False) -> AddedToken:
    return AddedToken(text, special=True, normalized=normalized, lstrip=lstrip)


def _authors_special(role: str, *, normalized: bool = False) -> AddedToken:
    """The special token of ``role`` as the authors' tokenizers match it (mask tokens ``lstrip``)."""
    return _special(SPECIAL_TOKENS[role], lstrip=role in _LSTRIP_ROLES, normalized=normalized)


def _check_files(**files: str | os.PathLike) -> None:
    for name, path in files.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name} {os.fspath(path)!r} does not exist")


def _read_bpe_files(vocab_file: str | os.PathLike, merges_file: str | os.PathLike):
    """(vocab, merges) of a byte-level BPE's ``vocab.json`` and ``merges.txt``."""
    _check_files(vocab_file=vocab_file, merges_file=merges_file)
    try:
        return models.BPE.read_file(os.fspath(vocab_file), os.fspath(merges_file))
    except Exception as exc:  # the tokenizers package raises plain Exceptions
        raise ValueError(
            f"vocab_file {os.fspath(vocab_file)!r} and merges_file {os.fspath(merges_file)!r} are not a BPE "
            f"vocab.json and merges.txt: {exc}"
        ) from exc


def _byte_level(model: models.Model) -> Tokenizer:
    """GPT-2's byte-level setup (no prefix space, so decoding gives back exactly the input)."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _find_special_ids(tokenizer: Tokenizer | SentencePieceTokenizer) -> SpecialIds:
    """Look the special tokens up by their texts; roles without a token of their own share one
    (``_SHARED_ROLES``, see the module docstring)."""
    ids = {role: tokenizer.token_to_id(text) for role, text in SPECIAL_TOKENS.items()}
    for role, shared in _SHARED_ROLES:
        if ids[role] is None:
            ids[role] = ids[shared]
    missing = [SPECIAL_TOKENS[role] for role, token_id in ids.items() if token_id is None]
    if missing:
        raise ValueError(
            f"tokenizer lacks GLM's special tokens {missing}; build one from the authors' files with "
            "GLMTokenizer.from_gpt2_files / from_wordpiece_file / from_roberta_files / from_sentencepiece_file"
        )
    return SpecialIds(**ids)
