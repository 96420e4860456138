"""glm_ext.data: token files (prepare-data) and the resumable packed-row stream."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm_ext.cli import main
from glm_ext.data.corpus import default_corpus
from glm_ext.data import datasets
from glm_ext.data.datasets import (
    PackedRowStream, TokenFile, prepare_token_file, token_dtype, token_file_paths, token_file_tokenizer_path)
from glm_ext.tokenizer import GLMTokenizer

DOCUMENTS = [
    "The first document.\nIt has two lines.\n",
    "Zweites Dokument: ünïcødé, emoji 🎉, CRLF\r\nline endings.",
    "Third, with a [MASK] and <|endoftext|> inside its text?",
]


@pytest.fixture(scope="module")
def tokenizer() -> GLMTokenizer:
    return GLMTokenizer.train(default_corpus()[:20], 600)


def stored_texts(token_file: TokenFile, tokenizer: GLMTokenizer) -> list[str]:
    """Each stored document decoded, after checking that it ends with exactly one <eos>."""
    eos = tokenizer.special_ids.eos
    texts = []
    for i in range(len(token_file)):
        document = token_file.document(i)
        assert document[-1] == eos
        texts.append(tokenizer.decode(document[:-1].tolist()))
    return texts


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def make_token_file(tmp_path: Path, tokenizer: GLMTokenizer, count: int = 12) -> TokenFile:
    """``count`` distinct documents of different lengths."""
    records = [{"text": f"Document {i}. " + "Some words here. " * (i % 5 + 1)} for i in range(count)]
    source = write_jsonl(tmp_path / "docs.jsonl", records)
    return prepare_token_file([source], tokenizer, tmp_path / "tokens")


# ----- prepare_token_file and TokenFile -------------------------------------------------------------


def test_directory_of_text_files_round_trips(tmp_path, tokenizer):
    # sorted recursively: a.txt, b/c.txt, b/d.txt; other suffixes ignored
    (tmp_path / "src" / "b").mkdir(parents=True)
    for name, text in zip(("a.txt", "b/c.txt", "b/d.txt"), DOCUMENTS):
        (tmp_path / "src" / name).write_bytes(text.encode())
    (tmp_path / "src" / "notes.md").write_text("ignored", encoding="utf-8")
    token_file = prepare_token_file([tmp_path / "src"], tokenizer, tmp_path / "out" / "tokens")

    assert stored_texts(token_file, tokenizer) == DOCUMENTS
    lengths = [len(tokenizer.encode(text)) + 1 for text in DOCUMENTS]
    np.testing.assert_array_equal(token_file.offsets, np.cumsum([0, *lengths]))
    assert token_file.tokens.dtype == np.uint16
    assert token_file.num_tokens == sum(lengths)
    meta = token_file.metadata
    assert (meta["num_documents"], meta["num_tokens"], meta["vocab_size"]) == (3, sum(lengths), 600)
    assert meta["special_ids"]["eos"] == tokenizer.special_ids.eos
    assert meta["tokenizer_sha256"] == tokenizer.sha256
    assert meta["sources"] == [str(tmp_path / "src")]
    assert token_file.special_ids == tokenizer.special_ids


def test_jsonl_round_trips_and_skips_blank_documents(tmp_path, tokenizer):
    records = [{"text": DOCUMENTS[0], "id": 1}, {"text": "   \n"}, {"text": DOCUMENTS[1]}, {"text": DOCUMENTS[2]}]
    source = write_jsonl(tmp_path / "docs.jsonl", records)
    with open(source, "a", encoding="utf-8") as f:
        f.write("\n  \n")  # blank lines are not records
    token_file = prepare_token_file([source], tokenizer, tmp_path / "tokens")
    assert stored_texts(token_file, tokenizer) == DOCUMENTS
    assert token_file.metadata["skipped_blank_documents"] == 1


def test_jsonl_text_key(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"body": text, "text": 0} for text in DOCUMENTS])
    token_file = prepare_token_file([source], tokenizer, tmp_path / "tokens", text_key="body")
    assert stored_texts(token_file, tokenizer) == DOCUMENTS
    assert token_file.metadata["text_key"] == "body"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.text(min_size=1).filter(str.strip), min_size=1, max_size=5))
def test_any_documents_round_trip(tokenizer, documents):
    with tempfile.TemporaryDirectory() as folder:
        source = write_jsonl(Path(folder) / "docs.jsonl", [{"text": text} for text in documents])
        token_file = prepare_token_file([source], tokenizer, Path(folder) / "tokens", batch_size=2)
        assert stored_texts(token_file, tokenizer) == documents


def test_sources_and_default_corpus_in_order(tmp_path, tokenizer):
    text_file = tmp_path / "one.txt"
    text_file.write_text(DOCUMENTS[0], encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "two.jsonl", [{"text": DOCUMENTS[1]}, {"text": DOCUMENTS[2]}])
    token_file = prepare_token_file([jsonl, text_file], tokenizer, tmp_path / "tokens", with_default_corpus=True)
    corpus = default_corpus()
    assert len(token_file) == 3 + len(corpus)
    texts = stored_texts(token_file, tokenizer)
    assert texts[:3] == [DOCUMENTS[1], DOCUMENTS[2], DOCUMENTS[0]]
    assert texts[3:] == corpus
    assert token_file.metadata["sources"][-1].startswith("pydoc_data.topics")


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(50265) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, tokenizer, monkeypatch):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in DOCUMENTS])
    prepare_token_file([source], tokenizer, tmp_path / "old")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    real_encode_batch = GLMTokenizer.encode_batch
    calls = []

    def encode_batch_then_fail(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real_encode_batch(self, texts)

    monkeypatch.setattr(GLMTokenizer, "encode_batch", encode_batch_then_fail)
    for prefix in ("old", "new"):
        calls.clear()
        with pytest.raises(RuntimeError, match="disk on fire"):
            prepare_token_file([source], tokenizer, tmp_path / prefix, batch_size=1)
        assert calls == [1, 1]  # it failed mid-write, after a first batch
        assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert len(TokenFile(tmp_path / "old")) == 3


@pytest.mark.parametrize(
    "make_sources, error, message",
    [
        (lambda d: [d / "missing.txt"], FileNotFoundError, "missing.txt"),
        (lambda d: [], ValueError, "sources is empty"),
        (lambda d: [d / "empty"], ValueError, "holds no .txt or .jsonl"),
        (lambda d: [d / "data.csv"], ValueError, "unsupported file type"),
        (lambda d: [d / "blank.txt"], ValueError, "no non-blank documents"),
        (lambda d: [d / "bad.jsonl"], ValueError, r"bad.jsonl:2: not valid JSON"),
        (lambda d: [d / "nokey.jsonl"], ValueError, r"nokey.jsonl:1: no 'text' field \(text_key\)"),
        (lambda d: [d / "list.jsonl"], ValueError, r"list.jsonl:1: no 'text' field"),
        (lambda d: [d / "number.jsonl"], ValueError, r"number.jsonl:1: the 'text' field is not a string"),
        (lambda d: [d / "latin1.txt"], ValueError, "latin1.txt' is not UTF-8"),
    ],
)
def test_bad_inputs_name_the_problem(tmp_path, tokenizer, make_sources, error, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    (tmp_path / "blank.txt").write_text(" \n\n", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    write_jsonl(tmp_path / "nokey.jsonl", [{"body": "x"}])
    write_jsonl(tmp_path / "list.jsonl", [["text"]])
    write_jsonl(tmp_path / "number.jsonl", [{"text": 3}])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error, match=message):
        prepare_token_file(make_sources(tmp_path), tokenizer, tmp_path / "tokens")
    assert sorted(os.listdir(tmp_path)) == before


def test_token_file_checks_its_parts(tmp_path, tokenizer):
    token_file = make_token_file(tmp_path, tokenizer)
    assert len(TokenFile(tmp_path / "tokens.bin")) == len(token_file)  # the .bin path names it too
    bin_path, idx_path, meta_path = token_file_paths(tmp_path / "tokens")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "num_tokens": meta["num_tokens"] + 1}))
    with pytest.raises(ValueError, match="inconsistent"):
        TokenFile(tmp_path / "tokens")
    idx_path.unlink()
    with pytest.raises(FileNotFoundError, match="idx.npy"):
        TokenFile(tmp_path / "tokens")
    with pytest.raises(IndexError):
        token_file.document(len(token_file))


def test_token_file_pickles_as_its_path(tmp_path, tokenizer):
    token_file = make_token_file(tmp_path, tokenizer)
    data = pickle.dumps(token_file)
    assert len(data) < 200
    copy = pickle.loads(data)
    np.testing.assert_array_equal(copy.tokens, token_file.tokens)
    assert isinstance(copy.tokens, np.memmap)


# ----- PackedRowStream ------------------------------------------------------------------------------


def take(stream: PackedRowStream, count: int) -> np.ndarray:
    return np.stack(list(itertools.islice(stream, count)))


def split_documents(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    ends = np.flatnonzero(tokens == eos) + 1
    return [tuple(part) for part in np.split(tokens, ends)[:-1]]


def test_rows_start_with_cls_and_have_the_exact_length(tmp_path, tokenizer):
    token_file = make_token_file(tmp_path, tokenizer)
    rows = take(PackedRowStream(token_file, 37, seed=0), 40)
    assert rows.shape == (40, 37) and rows.dtype == np.int64
    assert (rows[:, 0] == tokenizer.special_ids.cls).all()
    assert (rows[:, 1:] != tokenizer.special_ids.cls).all()
    assert (take(PackedRowStream(token_file, 5, seed=0, cls_id=999), 3)[:, 0] == 999).all()


def test_unshuffled_rows_are_the_documents_in_file_order_across_epochs(tmp_path, tokenizer):
    token_file = make_token_file(tmp_path, tokenizer)
    rows = take(PackedRowStream(token_file, 33, seed=0, shuffle=False), 100)
    stream = rows[:, 1:].ravel()
    expected = np.tile(np.asarray(token_file.tokens), len(stream) // token_file.num_tokens + 1)
    np.testing.assert_array_equal(stream, expected[: len(stream)])


def test_each_epoch_is_a_new_permutation_of_all_documents(tmp_path, tokenizer):
    token_file = make_token_file(tmp_path, tokenizer)
    epochs = 4
    rows = take(PackedRowStream(token_file, 50, seed=3), epochs * token_file.num_tokens // 49 + 1)
    documents = split_documents(rows[:, 1:].ravel(), tokenizer.special_ids.eos)
    originals = [tuple(token_file.document(i)) for i in range(len(token_file))]
    orders = []
    for epoch in range(epochs):
        chunk = documents[epoch * len(originals) : (epoch + 1) * len(originals)]
        assert sorted(chunk) == sorted(originals)
        orders.append([originals.index(document) for document in chunk])
    assert len({tuple(order) for order in orders}) == epochs


def test_seeds_decide_the_order(tmp_path, tokenizer):
    token_file = make_token_file(tmp_path, tokenizer)
    first = take(PackedRowStream(token_file, 64, seed=7), 30)
    np.testing.assert_array_equal(first, take(PackedRowStream(token_file, 64, seed=7), 30))
    assert not np.array_equal(first, take(PackedRowStream(token_file, 64, seed=8), 30))


@pytest.mark.parametrize("shuffle", [True, False])
def test_resumed_stream_yields_exactly_the_same_rows(tmp_path, tokenizer, shuffle):
    token_file = make_token_file(tmp_path, tokenizer)
    original = PackedRowStream(token_file, 24, seed=11, shuffle=shuffle)
    take(original, 37)
    state = json.loads(json.dumps(original.state_dict()))  # it survives a JSON round trip
    expected = take(original, 50)  # crosses epoch boundaries: an epoch is about 10 rows here
    resumed = PackedRowStream(token_file, 24, seed=12345, shuffle=shuffle)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(take(resumed, 50), expected)
    assert resumed.state_dict() == original.state_dict()


def test_skip_advances_like_taking_rows(tmp_path, tokenizer):
    token_file = make_token_file(tmp_path, tokenizer)
    taken, skipped = PackedRowStream(token_file, 20, seed=1), PackedRowStream(token_file, 20, seed=1)
    take(taken, 45)
    skipped.skip(45)
    assert skipped.state_dict() == taken.state_dict()


def test_bad_arguments_and_states_are_rejected(tmp_path, tokenizer):
    token_file = make_token_file(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="row_length"):
        PackedRowStream(token_file, 1, seed=0)
    stream = PackedRowStream(token_file, 16, seed=0)
    take(stream, 3)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="of 5 documents, this stream.s has 12"):
        stream.load_state_dict({**state, "num_documents": 5})
    with pytest.raises(ValueError, match="out of range"):
        stream.load_state_dict({**state, "offset": 10**6})
    assert stream.state_dict() == state  # a rejected state changes nothing
    with pytest.raises(ValueError, match="num_rows"):
        stream.skip(-1)


def test_dataloader_workers_take_disjoint_shards_and_can_resume(tmp_path, tokenizer):
    token_file = make_token_file(tmp_path, tokenizer)
    workers, batch, length = 2, 3, 16
    expected = take(PackedRowStream(token_file, length, seed=5), 4 * batch + 10)

    stream = PackedRowStream(token_file, length, seed=5)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers)
    batches = [b.numpy() for b in itertools.islice(loader, 4)]
    for k, got in enumerate(batches):  # batch k comes from worker k % W: its rows (j * B + i) * W + w
        worker, j = k % workers, k // workers
        np.testing.assert_array_equal(got, expected[[(j * batch + i) * workers + worker for i in range(batch)]])

    stream.skip(4 * batch)  # 4 batches, a multiple of W: exactly the first 4 * B rows were seen
    resumed = PackedRowStream(token_file, length, seed=0)
    resumed.load_state_dict(stream.state_dict())
    np.testing.assert_array_equal(take(resumed, 10), expected[4 * batch :])


def test_stream_pickles_with_its_position(tmp_path, tokenizer):
    token_file = make_token_file(tmp_path, tokenizer)
    stream = PackedRowStream(token_file, 16, seed=2)
    take(stream, 9)
    copy = pickle.loads(pickle.dumps(stream))
    np.testing.assert_array_equal(take(copy, 20), take(stream, 20))


# ----- glm-ext prepare-data -------------------------------------------------------------------------


def test_cli_trains_a_tokenizer_and_writes_a_token_file(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    for name, text in zip("abc", DOCUMENTS):
        (tmp_path / "src" / f"{name}.txt").write_text(text, encoding="utf-8")
    output = tmp_path / "out" / "tokens"
    assert main(["prepare-data", str(tmp_path / "src"), "--default-corpus", "--train-tokenizer", "400",
                 "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    tokenizer = GLMTokenizer.from_file(tmp_path / "out" / "tokens.tokenizer.json")
    # where glm-ext train looks for it, whether it is given the prefix or the .bin file
    assert token_file_tokenizer_path(output) == token_file_tokenizer_path(f"{output}.bin") == \
        tmp_path / "out" / "tokens.tokenizer.json"
    token_file = TokenFile(output)
    assert f"{len(token_file)} documents" in printed and "tokens/s" in printed
    assert tokenizer.vocab_size == 400 and token_file.metadata["tokenizer_sha256"] == tokenizer.sha256
    assert stored_texts(token_file, tokenizer)[:3] == DOCUMENTS

    assert main(["prepare-data", str(tmp_path / "src"), "--tokenizer", str(tmp_path / "out" / "tokens.tokenizer.json"),
                 "--output", str(tmp_path / "again")]) == 0
    assert len(TokenFile(tmp_path / "again")) == 3


def test_cli_reports_errors(tmp_path, capsys):
    assert main(["prepare-data", str(tmp_path / "nothing.txt"), "--train-tokenizer", "400",
                 "--output", str(tmp_path / "tokens")]) == 1
    assert "nothing.txt' does not exist" in capsys.readouterr().err


# ----- long documents, damaged files, outputs ------------------------------------------------------


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of about 64 characters, at most 300, encoded at most 256 characters at a time."""
    monkeypatch.setattr(datasets, "PIECE_CHARS", 64)
    monkeypatch.setattr(datasets, "MAX_PIECE_CHARS", 300)
    monkeypatch.setattr(datasets, "BATCH_CHARS", 256)


def test_long_documents_are_encoded_in_bounded_pieces_with_the_ids_of_the_whole(tmp_path, tokenizer, small_pieces,
                                                                                 monkeypatch):
    topics = default_corpus()
    long_text = "\n\n".join(topics[20:30]) + " [MASK] [gMASK]\tend  <|endoftext|> word\u3000x"
    texts = [long_text, "   \n\t  " * 200, "a" * 1000 + " b", "short one", "x" * 700]
    (tmp_path / "src").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "src" / f"{i}.txt").write_text(text, encoding="utf-8")
    encoded_at_once = []
    real_encode_batch = GLMTokenizer.encode_batch

    def spy(self, pieces):
        encoded_at_once.append(sum(map(len, pieces)))
        return real_encode_batch(self, pieces)

    monkeypatch.setattr(GLMTokenizer, "encode_batch", spy)
    token_file = prepare_token_file([tmp_path / "src"], tokenizer, tmp_path / "tokens")
    assert max(encoded_at_once) <= 300 and len(encoded_at_once) > len(long_text) // 300
    assert token_file.metadata["skipped_blank_documents"] == 1 and len(token_file) == 4
    kept = [text for text in texts if text.strip()]
    assert stored_texts(token_file, tokenizer) == kept
    # Cut only before words, so the ids are those of each document encoded whole; only the runs of
    # more than MAX_PIECE_CHARS characters without a space (the last two) may be cut inside.
    for i, text in enumerate(kept[:3]):
        assert token_file.document(i)[:-1].tolist() == tokenizer.encode(text), i


def test_a_tokenizer_trained_on_pieces_is_the_one_trained_on_whole_documents(small_pieces):
    documents = default_corpus()[:8]
    pieces = [piece for _, piece in datasets.iter_text_pieces([], with_default_corpus=True)]
    assert len(pieces) > 3 * len(default_corpus())
    whole = GLMTokenizer.train(documents, 400)
    cut = GLMTokenizer.train([p for n, p in datasets.iter_text_pieces([], with_default_corpus=True) if n < 8], 400)
    assert cut.sha256 == whole.sha256


@pytest.mark.parametrize("damage", [
    lambda meta: "not json {",
    lambda meta: "[1, 2]",
    lambda meta: json.dumps({k: v for k, v in meta.items() if k != "dtype"}),
    lambda meta: json.dumps({**meta, "dtype": "float32"}),
    lambda meta: json.dumps({**meta, "num_documents": "3"}),
    lambda meta: json.dumps({**meta, "num_tokens": True}),
    lambda meta: json.dumps({**meta, "special_ids": {**meta["special_ids"], "cls": "1"}}),
    lambda meta: json.dumps({**meta, "special_ids": {k: v for k, v in meta["special_ids"].items() if k != "eos"}}),
    lambda meta: json.dumps({**meta, "special_ids": None}),
])
def test_damaged_metadata_is_named(tmp_path, tokenizer, damage):
    make_token_file(tmp_path, tokenizer)
    meta_path = token_file_paths(tmp_path / "tokens")[2]
    meta_path.write_text(damage(json.loads(meta_path.read_text())))
    with pytest.raises(ValueError, match=rf"{meta_path} is damaged"):
        TokenFile(tmp_path / "tokens")


def test_damaged_boundaries_and_tokens_are_named(tmp_path, tokenizer):
    make_token_file(tmp_path, tokenizer)
    bin_path, idx_path, _ = token_file_paths(tmp_path / "tokens")
    good_idx = idx_path.read_bytes()
    for damaged in (b"garbage", good_idx[: len(good_idx) // 2]):
        idx_path.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"{idx_path} is damaged"):
            TokenFile(tmp_path / "tokens")
    np.save(idx_path, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=rf"{idx_path} is damaged \(float64 \[2\], expected int64"):
        TokenFile(tmp_path / "tokens")
    idx_path.write_bytes(good_idx)
    bin_path.write_bytes(bin_path.read_bytes() + b"\x00")  # half a uint16 token
    with pytest.raises(ValueError, match=rf"{bin_path} is damaged"):
        TokenFile(tmp_path / "tokens")


@pytest.mark.parametrize("output", ["o/", "o"])
def test_a_directory_output_is_refused(tmp_path, capsys, output):
    (tmp_path / "o").mkdir()
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    args = ["prepare-data", str(tmp_path / "a.txt"), "--train-tokenizer", "300", "--output", str(tmp_path / output)]
    assert main(args) == 1
    assert "is a directory; name the files inside it" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "o"] and os.listdir(tmp_path / "o") == []


def test_a_failed_run_leaves_no_trained_tokenizer(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text(" \n\n", encoding="utf-8")
    args = ["prepare-data", str(tmp_path / "blank.txt"), "--train-tokenizer", "300", "--output", str(tmp_path / "x")]
    assert main(args) == 1
    assert "no non-blank documents" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["blank.txt"]


def test_a_garbage_tokenizer_file_is_one_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    (tmp_path / "tok.json").write_text("garbage")
    assert main(["prepare-data", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--output", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: tokenizer file") and "tok.json' is not JSON" in err
    assert err.count("\n") == 1
