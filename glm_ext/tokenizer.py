"""GLM's tokenizer: byte-level BPE (Hugging Face ``tokenizers``) with GLM's special tokens.

Three ways to get one:

- :meth:`GLMTokenizer.train` learns a byte-level BPE on texts. The ten special tokens take ids 0..9 in
  GLM_SPEC section 4 order (``[pad]`` first), so small trained vocabularies have stable small ids.
- :meth:`GLMTokenizer.from_gpt2_files` loads GPT-2's ``vocab.json``/``merges.txt`` and appends the
  special tokens exactly as the authors did (``<|endoftext|>`` 50256 is both eos and pad, ``<sop>``
  50257 ... ``[sMASK]`` 50264), so the authors' GPT-2-vocabulary checkpoints line up.
- :meth:`GLMTokenizer.from_file` loads a ``tokenizer.json`` written by :meth:`GLMTokenizer.save` (or any
  tokenizer that holds the special tokens under the authors' texts).

Special tokens are written with the authors' texts (``<|startofpiece|>`` for ``<sop>`` and so on, see
:data:`SPECIAL_TOKENS`); they are never split by encoding, and decoding keeps them unless asked not to.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterable, Sequence

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

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

#: The roles the authors appended after GPT-2's 50257 tokens, in the order that gives ids 50257..50264.
_GPT2_APPENDED_ROLES = ("sop", "eop", "cls", "mask", "sep", "unk", "gmask", "smask")

#: A token ends a sentence when its text contains one of these (THUDM/GLM ``contains_sentence_end``).
SENTENCE_END_CHARACTERS = (".", "?", "!", ";", ":", "\n")

#: Embedding tables are padded to a multiple of this many rows (GLM_SPEC section 3).
VOCAB_PADDING_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids of GLM's special tokens, by role. With GPT-2 files ``pad == eos``."""

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
    """A byte-level BPE ``tokenizers.Tokenizer`` plus the ids of GLM's special tokens.

    Encoding never adds tokens of its own (no ``[CLS]``/``<eos>``): where those go is the data
    pipeline's decision (a document ends with ``<eos>``, a packed row starts with ``[CLS]``). For the
    same reason a loaded tokenizer's truncation and padding are switched off.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
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
        for name, path in (("vocab_file", vocab_file), ("merges_file", merges_file)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name} {os.fspath(path)!r} does not exist")
        tokenizer = _byte_level(models.BPE.from_file(os.fspath(vocab_file), os.fspath(merges_file)))
        if tokenizer.token_to_id(SPECIAL_TOKENS["eos"]) is None:
            raise ValueError(f"vocab_file {os.fspath(vocab_file)!r} has no {SPECIAL_TOKENS['eos']!r} token")
        roles = ("eos", *_GPT2_APPENDED_ROLES)
        tokenizer.add_special_tokens([_special(SPECIAL_TOKENS[role]) for role in roles])
        return cls(tokenizer)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GLMTokenizer:
        """Load a ``tokenizer.json`` (as written by :meth:`save`)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {os.fspath(path)!r} does not exist")
        return cls(Tokenizer.from_file(os.fspath(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one ``tokenizer.json`` that :meth:`from_file` reads back."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tokenizer.save(os.fspath(path))

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

        The authors' rule: a token whose text contains ``. ? ! ; :`` or a newline. For byte-level BPE
        the text is the token decoded on its own; special tokens never count.
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


def _special(text: str) -> AddedToken:
    return AddedToken(text, special=True, normalized=False)


def _byte_level(model: models.Model) -> Tokenizer:
    """GPT-2's byte-level setup (no prefix space, so decoding gives back exactly the input)."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _find_special_ids(tokenizer: Tokenizer) -> SpecialIds:
    """Look the special tokens up by their texts; a vocabulary without ``[PAD]`` pads with eos (GPT-2)."""
    ids = {role: tokenizer.token_to_id(text) for role, text in SPECIAL_TOKENS.items()}
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]
    missing = [SPECIAL_TOKENS[role] for role, token_id in ids.items() if token_id is None]
    if missing:
        raise ValueError(
            f"tokenizer lacks GLM's special tokens {missing}; "
            "use GLMTokenizer.from_gpt2_files for GPT-2 vocab/merges files"
        )
    return SpecialIds(**ids)
