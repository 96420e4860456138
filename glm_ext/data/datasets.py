"""Pretraining data: text tokenised once into a memory-mapped token file, then streamed as packed rows.

A token file is three siblings sharing a prefix (``glm-ext prepare-data`` writes them):

- ``<prefix>.bin``: every document's tokens followed by ``<eos>`` (GLM_SPEC section 1), concatenated,
  as a flat ``uint16`` array (``uint32`` when the vocabulary has more than 65536 tokens);
- ``<prefix>.idx.npy``: ``int64`` document boundaries, ``num_documents + 1`` of them, so document
  ``i`` is ``bin[idx[i]:idx[i + 1]]``;
- ``<prefix>.json``: metadata (dtype, counts, vocabulary sizes, special ids, the tokenizer's
  fingerprint, the sources);
- ``<prefix>.tokenizer.json`` (only when ``prepare-data`` trained the tokenizer): that tokenizer.

Sources: a ``.txt`` file is one document (its exact text: a file is an article, not a paragraph; put
many documents in one file as ``.jsonl``); a ``.jsonl`` file holds one JSON object per line with the
text under ``text_key``; a directory contributes its ``.txt`` and ``.jsonl`` files, recursively, in
sorted path order. Blank documents are skipped (and counted in the metadata).

Memory stays bounded however long a document is: text is read and encoded in pieces of about
``PIECE_CHARS`` characters (:func:`iter_text_pieces`; a ``.jsonl`` line is read whole first). A piece
ends just before a space or newline that a letter, digit or underscore follows, never inside a
word. A document's token ids are the concatenation of its pieces' encodings, which for GLM's
byte-level BPE are exactly the ids of encoding it whole: GPT-2's pre-tokenizer, which BPE never
merges across, splits before such a character anyway (and GLM's special tokens, split out first,
start with ``[`` or ``<``). Only a run of more than ``MAX_PIECE_CHARS`` characters without such a
place is cut inside (where the ids may differ).

:class:`PackedRowStream` turns a token file into the authors' pretraining rows: ``[CLS]`` followed by
the next ``row_length - 1`` tokens of the documents concatenated in a seeded shuffled order.
"""

from __future__ import annotations

import array
import copy
import dataclasses
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch.utils.data

from glm_ext.data.corpus import DEFAULT_CORPUS_NAME, default_corpus
from glm_ext.files import staged_files
from glm_ext.tokenizer import GLMTokenizer, SpecialIds

TOKEN_FILE_VERSION = 1
SOURCE_SUFFIXES = (".txt", ".jsonl")
PIECE_CHARS = 1 << 16  # documents are read and encoded in pieces of about this many characters
MAX_PIECE_CHARS = 1 << 20  # ... and cut here even inside a word, when no whitespace allows a cut sooner
BATCH_CHARS = 1 << 20  # characters encoded at once (the tokenizer needs ~200 bytes per character)
_CUT = re.compile(r"[ \n](?=\w)")  # a piece may start at a space or newline that a word follows

StrPath = str | os.PathLike


# ----- reading sources ----------------------------------------------------------------------------


def _source_files(sources: Sequence[StrPath]) -> list[Path]:
    """The files that ``sources`` name, directories expanded; checks them all before any work starts."""
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"source directory {str(source)!r} holds no .txt or .jsonl files")
            files.extend(found)
        elif source.is_file():
            if source.suffix not in SOURCE_SUFFIXES:
                raise ValueError(f"source {str(source)!r}: unsupported file type (expected .txt or .jsonl)")
            files.append(source)
        else:
            raise FileNotFoundError(f"source {str(source)!r} does not exist")
    return files


def iter_text_pieces(
    sources: Sequence[StrPath], *, text_key: str = "text", with_default_corpus: bool = False
) -> Iterator[tuple[int, str]]:
    """``(document number, piece of its text)`` for the documents of ``sources`` (then of the default
    corpus), in order; every document gives at least one piece (an empty one for empty text), long
    ones several (see the module docstring).

    The sources are checked at once (missing files, unsupported types, empty directories); problems
    inside a file (bad JSON, a missing ``text_key``, bytes that are not UTF-8) surface when reached.
    """
    files = _source_files(sources)
    if not files and not with_default_corpus:
        raise ValueError("sources is empty and with_default_corpus is False: there is nothing to read")
    documents = itertools.chain.from_iterable(_read_file(path, text_key) for path in files)
    if with_default_corpus:
        documents = itertools.chain(documents, ([text] for text in default_corpus()))
    for number, blocks in enumerate(documents):
        for piece in _pieces(blocks):
            yield number, piece


def _pieces(blocks: Iterable[str]) -> Iterator[str]:
    """The text made of ``blocks`` in pieces cut where encoding may be split (module docstring): as
    long as possible up to ``PIECE_CHARS`` characters, else as short as possible up to ``MAX_PIECE_CHARS``."""
    size, max_size = PIECE_CHARS, MAX_PIECE_CHARS
    buffer, done = "", False
    for block in itertools.chain(blocks, [None]):
        if block is None:
            done = True
        else:
            buffer += block
        while len(buffer) > size + 1:
            cut = _last_cut(buffer, size)
            if not cut:
                found = _CUT.search(buffer, size, max_size + 2)  # the first cut after size, up to max_size
                cut = found.start() if found else 0
            if not cut:
                if len(buffer) < max_size + 2 and not done:
                    break  # read on: a cut may follow
                if len(buffer) <= max_size:
                    break  # the end of the text: what is left is the last piece
                cut = max_size
            yield buffer[:cut]
            buffer = buffer[cut:]
    yield buffer


def _last_cut(text: str, limit: int) -> int:
    """The last place ``1 <= i <= limit`` where a piece may start (``_CUT``; needs
    ``len(text) >= limit + 2``), or 0 when there is none."""
    i = limit
    while i >= 1:
        i = max(text.rfind(" ", 1, i + 1), text.rfind("\n", 1, i + 1))
        if i < 1:
            return 0
        if _CUT.match(text, i):
            return i
        i -= 1
    return 0


def _read_file(path: Path, text_key: str) -> Iterator[Iterable[str]]:
    """The documents of one source file, each as the consecutive blocks of its text."""
    if path.suffix == ".jsonl":
        yield from ([text] for text in _read_jsonl(path, text_key))
    else:
        yield _read_text(path)


def _read_text(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", newline="") as file:  # newline="": keep the text exact
            while block := file.read(PIECE_CHARS):
                yield block
    except UnicodeDecodeError as error:
        raise ValueError(f"source {str(path)!r} is not UTF-8 text ({error})") from error


def _read_jsonl(path: Path, text_key: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
                if not isinstance(record, dict) or text_key not in record:
                    raise ValueError(f"{where}: no {text_key!r} field (text_key) in this line")
                if not isinstance(record[text_key], str):
                    raise ValueError(f"{where}: the {text_key!r} field is not a string")
                yield record[text_key]
    except UnicodeDecodeError as error:
        raise ValueError(f"source {str(path)!r} is not UTF-8 text ({error})") from error


# ----- writing a token file -----------------------------------------------------------------------


def token_file_paths(prefix: StrPath) -> tuple[Path, Path, Path]:
    """The ``.bin``, ``.idx.npy`` and ``.json`` files of the token file at ``prefix``."""
    base = os.fspath(_prefix(prefix))
    return Path(base + ".bin"), Path(base + ".idx.npy"), Path(base + ".json")


def token_file_tokenizer_path(prefix: StrPath) -> Path:
    """Where ``glm-ext prepare-data --train-tokenizer`` saves the tokenizer of the token file at ``prefix``
    (``<prefix>.tokenizer.json``), and where ``glm-ext train`` looks for it by default."""
    return Path(os.fspath(_prefix(prefix)) + ".tokenizer.json")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id (uint16 for GPT-2's 50265 tokens)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare_token_file(
    sources: Sequence[StrPath],
    tokenizer: GLMTokenizer,
    output: StrPath,
    *,
    text_key: str = "text",
    with_default_corpus: bool = False,
    batch_size: int = 512,
    progress: Callable[[int], None] | None = None,
) -> TokenFile:
    """Tokenise ``sources`` (and the default corpus) into the token file at prefix ``output``.

    Text is read and encoded in pieces (at most ``batch_size`` pieces and about ``BATCH_CHARS``
    characters at a time), so memory stays bounded however large the input or any one document is
    (module docstring). All three files appear at once or not at all
    (:func:`glm_ext.files.staged_files`; an older token file stays intact otherwise). ``progress``
    is called with the number of characters encoded, batch by batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    paths = token_file_paths(output)
    pieces = iter_text_pieces(sources, text_key=text_key, with_default_corpus=with_default_corpus)
    names = [os.fspath(s) for s in sources] + ([DEFAULT_CORPUS_NAME] if with_default_corpus else [])
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    # The metadata goes last, and TokenFile checks the counts it records against the other two files,
    # so a crash between the renames is caught (the counts disagree) rather than read as data.
    with staged_files(paths) as (bin_temp, idx_temp, meta_temp):
        with open(bin_temp, "wb") as out:
            offsets, skipped = _write_tokens(pieces, tokenizer, out, dtype, batch_size, progress)
        if len(offsets) == 1:
            raise ValueError(f"sources {names} hold no non-blank documents")
        with open(idx_temp, "wb") as out:
            np.save(out, np.frombuffer(offsets, dtype=np.int64))
        metadata = {
            "format": "glm_ext token file",
            "version": TOKEN_FILE_VERSION,
            "dtype": dtype.name,
            "num_documents": len(offsets) - 1,
            "num_tokens": offsets[-1],
            "skipped_blank_documents": skipped,
            "vocab_size": tokenizer.vocab_size,
            "padded_vocab_size": tokenizer.padded_vocab_size,
            "special_ids": dataclasses.asdict(tokenizer.special_ids),
            "tokenizer_sha256": tokenizer.sha256,
            "sources": names,
            "text_key": text_key,
        }
        with open(meta_temp, "w", encoding="utf-8") as out:
            json.dump(metadata, out, indent=2)
    return TokenFile(output)


def _write_tokens(
    pieces: Iterable[tuple[int, str]], tokenizer: GLMTokenizer, out: BinaryIO, dtype: np.dtype, batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[array.array, int]:
    """Write each non-blank document's tokens and ``<eos>``; return the boundaries and the blank count.

    The boundaries are kept as packed int64 (8 bytes a document), the only thing that grows with the
    input. A document turns out blank only at its end: its tokens are then cut off the file again.
    """
    offsets, skipped = array.array("q", [0]), 0
    written, document, has_text = 0, None, False

    def end_document() -> None:
        nonlocal written, skipped
        if has_text:
            np.asarray([tokenizer.special_ids.eos], dtype=dtype).tofile(out)
            written += 1
            offsets.append(written)
        else:
            skipped += 1
            written = offsets[-1]
            out.seek(written * dtype.itemsize)
            out.truncate()

    for batch in _batches(pieces, batch_size, BATCH_CHARS):
        for (number, piece), ids in zip(batch, tokenizer.encode_batch([piece for _, piece in batch])):
            if number != document:
                if document is not None:
                    end_document()
                document, has_text = number, False
            has_text = has_text or bool(piece.strip())
            np.asarray(ids, dtype=dtype).tofile(out)
            written += len(ids)
        if progress is not None:
            progress(sum(len(piece) for _, piece in batch))
    if document is not None:
        end_document()
    return offsets, skipped


def _batches(pieces: Iterable[tuple[int, str]], size: int, max_chars: int) -> Iterator[list[tuple[int, str]]]:
    """Consecutive runs of at most ``size`` pieces and (unless one piece is longer) ``max_chars`` characters."""
    batch, chars = [], 0
    for item in pieces:
        if batch and chars + len(item[1]) > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(item)
        chars += len(item[1])
        if len(batch) == size:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _prefix(path: StrPath) -> Path:
    """A token file's prefix; naming its ``.bin`` file works too. A directory is refused: the files
    would land beside it (``o/`` would give ``o.bin``)."""
    if os.fspath(path).endswith((os.sep, "/")) or Path(path).is_dir():
        raise ValueError(f"token file prefix {os.fspath(path)!r} is a directory; name the files inside it, "
                         f"e.g. {os.path.join(os.fspath(path), 'tokens')!r}")
    path = Path(path)
    return path.with_suffix("") if path.suffix == ".bin" else path


# ----- reading a token file -----------------------------------------------------------------------


class TokenFile:
    """A token file opened read-only: the tokens are memory-mapped, never loaded whole.

    Pickles as its path (DataLoader workers reopen the map instead of copying the tokens).
    """

    def __init__(self, path: StrPath) -> None:
        self.path = _prefix(path)
        bin_path, idx_path, meta_path = token_file_paths(self.path)
        for part in (meta_path, bin_path, idx_path):
            if not part.is_file():
                raise FileNotFoundError(f"token file {str(self.path)!r}: {str(part)!r} does not exist")
        self.metadata: dict[str, Any] = _read_metadata(meta_path)
        self.special_ids = SpecialIds(**self.metadata["special_ids"])
        damaged = "is damaged ({}); write the token file again with glm-ext prepare-data"
        try:
            self.tokens = np.memmap(bin_path, dtype=self.metadata["dtype"], mode="r")
        except ValueError as error:  # a size that is not a whole number of tokens, or empty
            raise ValueError(f"{bin_path} " + damaged.format(error)) from error
        try:
            self.offsets: np.ndarray = np.load(idx_path)
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"{idx_path} " + damaged.format(error)) from error
        if self.offsets.dtype != np.int64 or self.offsets.ndim != 1 or len(self.offsets) < 2:
            raise ValueError(f"{idx_path} " + damaged.format(f"{self.offsets.dtype} {list(self.offsets.shape)}, "
                                                             "expected int64 [num_documents + 1]"))
        self._check_consistent()

    def _check_consistent(self) -> None:
        """The three files agree (catches a crash between the renames of a rewrite)."""
        counts = (len(self.offsets) - 1, len(self.tokens), int(self.offsets[0]), int(self.offsets[-1]))
        expected = (self.metadata["num_documents"], self.metadata["num_tokens"], 0, self.metadata["num_tokens"])
        if counts != expected or np.any(np.diff(self.offsets) <= 0):
            raise ValueError(
                f"token file {str(self.path)!r} is inconsistent (documents, tokens, first and last "
                f"boundary {counts}, metadata says {expected}); write it again with glm-ext prepare-data"
            )

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return TokenFile, (os.fspath(self.path),)

    def __len__(self) -> int:
        """The number of documents."""
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document(self, index: int) -> np.ndarray:
        """Document ``index``'s tokens, ending with ``<eos>`` (a read-only view of the map)."""
        if not 0 <= index < len(self):
            raise IndexError(f"document index {index} out of range for {len(self)} documents")
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]


def _read_metadata(path: Path) -> dict[str, Any]:
    """A token file's metadata, checked for the fields and types that reading relies on."""
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # not UTF-8, not JSON
        raise ValueError(
            f"{path} is damaged (not JSON: {error}); write the token file again with glm-ext prepare-data"
        ) from error
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} is damaged (not a JSON object); write the token file again with glm-ext prepare-data")
    if metadata.get("version") != TOKEN_FILE_VERSION:
        raise ValueError(f"{path}: unsupported token file version {metadata.get('version')!r}")

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    special = metadata.get("special_ids")
    problems = [name for name, ok in (
        ("dtype", metadata.get("dtype") in ("uint16", "uint32")),
        ("num_documents", count(metadata.get("num_documents"))),
        ("num_tokens", count(metadata.get("num_tokens"))),
        ("special_ids", isinstance(special, dict)
         and set(special) == {f.name for f in dataclasses.fields(SpecialIds)} and all(map(count, special.values()))),
    ) if not ok]
    if problems:
        raise ValueError(f"{path} is damaged (missing or invalid: {', '.join(problems)}); "
                         "write the token file again with glm-ext prepare-data")
    return metadata


# ----- streaming packed rows ----------------------------------------------------------------------


class PackedRowStream(torch.utils.data.IterableDataset):
    """Endless pretraining rows: ``[CLS]`` then the next ``row_length - 1`` tokens of the documents.

    Each epoch concatenates all documents (each ending with ``<eos>``) in a new permutation drawn from
    one seeded PCG64 generator (file order when ``shuffle`` is False). Rows span document boundaries
    like the authors' rows, and the tail of an epoch carries into the next epoch's first row, so no
    token is dropped and the rows are a function of the token file and the seed alone.

    The stream is its own position: iterating advances it, :meth:`state_dict` captures it (epoch,
    position in the permutation, offset in the current document, and the generator state from which
    this epoch's permutation was drawn), and :meth:`load_state_dict` on a stream built the same way
    continues with exactly the rows the original would have yielded next.

    DataLoader workers: worker ``w`` of ``W`` yields rows ``w, w + W, w + 2W, ...`` of the stream as it
    stood when the DataLoader started iterating, each worker on its own copy. So the main process's
    stream does not advance, and only ``num_workers=0`` resumes exactly by itself. With workers, after
    consuming ``k`` batches of ``B`` rows with ``k`` a multiple of ``W``, exactly the stream's next
    ``k * B`` rows have been seen: call ``stream.skip(k * B)`` and then :meth:`state_dict`.
    """

    def __init__(
        self, token_file: TokenFile, row_length: int, *, seed: int, cls_id: int | None = None, shuffle: bool = True
    ) -> None:
        super().__init__()
        if row_length < 2:
            raise ValueError(f"row_length must be at least 2 ([CLS] and one token), got {row_length}")
        self.token_file = token_file
        self.row_length = row_length
        self.cls_id = token_file.special_ids.cls if cls_id is None else cls_id
        self.shuffle = shuffle
        self._enter(epoch=0, rng_state=np.random.PCG64(seed).state)

    def _enter(self, *, epoch: int, rng_state: dict[str, Any], position: int = 0, offset: int = 0) -> None:
        """Go to ``epoch`` (its order drawn from ``rng_state``), document ``position``, token ``offset``.

        Everything is checked before anything changes, so a bad state leaves the stream as it was.
        """
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = rng_state
        count = len(self.token_file)
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        if not 0 <= position < count or not 0 <= offset < len(self.token_file.document(int(order[position]))):
            raise ValueError(f"stream position {position} / offset {offset} is out of range")
        self._epoch, self._epoch_rng_state, self._rng = epoch, copy.deepcopy(rng_state), rng
        self._order, self._position, self._offset = order, position, offset

    def __iter__(self) -> Iterator[np.ndarray]:
        worker = torch.utils.data.get_worker_info()
        shard, num_shards = (0, 1) if worker is None else (worker.id, worker.num_workers)
        self.skip(shard)
        while True:
            yield self.next_row()
            self.skip(num_shards - 1)

    def next_row(self) -> np.ndarray:
        """The next row: ``int64``, exactly ``row_length`` long, starting with ``[CLS]``."""
        row = np.empty(self.row_length, dtype=np.int64)
        row[0] = self.cls_id
        self._consume(self.row_length - 1, row[1:])
        return row

    def skip(self, num_rows: int) -> None:
        """Advance past ``num_rows`` rows without building them."""
        if num_rows < 0:
            raise ValueError(f"num_rows must be non-negative, got {num_rows}")
        self._consume(num_rows * (self.row_length - 1), None)

    def _consume(self, count: int, out: np.ndarray | None) -> None:
        """Take the stream's next ``count`` tokens (into ``out`` unless it is None)."""
        offsets, tokens = self.token_file.offsets, self.token_file.tokens
        done = 0
        while done < count:
            document = self._order[self._position]
            start = offsets[document] + self._offset
            take = min(count - done, offsets[document + 1] - start)
            if out is not None:
                out[done : done + take] = tokens[start : start + take]
            done += take
            self._offset += take
            if start + take == offsets[document + 1]:
                self._next_document()

    def _next_document(self) -> None:
        self._position += 1
        self._offset = 0
        if self._position == len(self._order):
            self._enter(epoch=self._epoch + 1, rng_state=self._rng.bit_generator.state)

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands (plain Python values: fits ``json`` and ``torch.save``)."""
        return {
            "epoch": self._epoch,
            "position": int(self._position),
            "offset": int(self._offset),
            "rng_state": copy.deepcopy(self._epoch_rng_state),
            "num_documents": len(self.token_file),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from a stream over the same token file with the same settings)."""
        if state["num_documents"] != len(self.token_file):
            raise ValueError(
                f"state is for a token file of {state['num_documents']} documents, "
                f"this stream's has {len(self.token_file)}"
            )
        self._enter(
            epoch=state["epoch"], rng_state=state["rng_state"], position=state["position"], offset=state["offset"]
        )
