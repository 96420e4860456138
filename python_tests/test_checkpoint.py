"""glm_ext.checkpoint: our safetensors format, the authors' layouts, and `glm-ext convert`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from glm_ext import checkpoint
from glm_ext.checkpoint import (
    export_authors_state_dict,
    import_authors_checkpoint,
    load_checkpoint,
    save_authors_checkpoint,
    save_checkpoint,
)
from glm_ext.cli import main as cli_main
from glm_ext.data.corpus import default_corpus
from glm_ext.generation import fill_blanks
from glm_ext.model import GLMConfig, GLMModel
from glm_ext.run_dir import resolve_model_source
from glm_ext.tokenizer import GLMTokenizer
from tokenizer_files import train_sentencepiece, write_bpe_files, write_wordpiece_vocab

CONFIG = GLMConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, max_sequence_length=12)


def random_model(config=CONFIG, dtype=torch.float32):
    model = GLMModel(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # LayerNorms and biases too: a swap of any two tensors shows
    return model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def assert_same_logits(a, b):
    ids = torch.randint(0, a.config.vocab_size, (2, 7))
    positions = torch.randint(0, a.config.max_sequence_length + 1, (2, 2, 7))
    sep = torch.tensor([3, 7])
    assert torch.equal(a(ids, positions, sep), b(ids, positions, sep))


def spec_keys(num_layers):
    """GLM_SPEC 3's list of the authors' keys, written out independently of the model."""
    keys = [
        "word_embeddings.weight",
        "transformer.position_embeddings.weight",
        "transformer.block_position_embeddings.weight",
        "transformer.final_layernorm.weight",
        "transformer.final_layernorm.bias",
    ]
    for i in range(num_layers):
        for name in ("input_layernorm", "attention.query_key_value", "attention.dense",
                     "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            keys += [f"transformer.layers.{i}.{name}.weight", f"transformer.layers.{i}.{name}.bias"]
    return keys


def leftovers(directory):
    """Temporary files or directories that a writer left next to its target."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Our format


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("encoding", ["learned_2d", "rotary_2d"])
def test_save_load_round_trip_is_exact(tmp_path, dtype, encoding):
    config = GLMConfig(**{**CONFIG.to_dict(), "position_encoding": encoding})
    model = random_model(config, dtype)
    target = save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(os.listdir(target)) == ["config.json", "manifest.json", "model.safetensors"]
    assert json.loads((target / "config.json").read_text()) == config.to_dict()
    loaded = load_checkpoint(target, attention_backend="reference")
    assert loaded.config == config and loaded.attention_backend == "reference"
    assert_same_weights(loaded, model)
    if dtype == torch.float32:
        loaded.attention_backend = model.attention_backend
        assert_same_logits(loaded, model)
    assert leftovers(tmp_path) == []


def test_save_state_dict_needs_its_config(tmp_path):
    model = random_model()
    with pytest.raises(ValueError, match="needs its config"):
        save_checkpoint(model.state_dict(), tmp_path / "a")
    save_checkpoint(model.state_dict(), tmp_path / "a", config=CONFIG)
    assert_same_weights(load_checkpoint(tmp_path / "a"), model)


def test_save_checks_the_weights_before_writing(tmp_path):
    state = random_model().state_dict()
    del state["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): transformer.layers.1.mlp.dense_4h_to_h.bias"):
        save_checkpoint(state, tmp_path / "a", config=CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_checkpoint_is_replaced_only_when_the_new_one_is_complete(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    old, new = random_model(), random_model()
    save_checkpoint(old, target)

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(new, target, overwrite=True)
    assert_same_weights(load_checkpoint(target), old)
    assert leftovers(tmp_path) == []

    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="already holds a checkpoint; pass overwrite=True"):
        save_checkpoint(new, target)
    save_checkpoint(new, target, overwrite=True)
    assert_same_weights(load_checkpoint(target), new)
    assert leftovers(tmp_path) == []


def test_other_data_is_never_replaced(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds files other than a glm_ext checkpoint \(todo.txt\)"):
        save_checkpoint(random_model(), tmp_path / "notes")
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a plain directory"):
        save_checkpoint(random_model(), tmp_path / "file")
    (tmp_path / "link").symlink_to(tmp_path / "notes")
    with pytest.raises(FileExistsError, match="is not a plain directory"):
        save_checkpoint(random_model(), tmp_path / "link")
    assert (tmp_path / "notes" / "todo.txt").read_text() == (tmp_path / "file").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    save_checkpoint(random_model(), tmp_path / "empty")  # an empty directory is fine


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a glm_ext checkpoint"):
        load_checkpoint(tmp_path)
    target = save_checkpoint(random_model(), tmp_path / "ckpt")
    (target / "manifest.json").unlink()  # as written before checksums: the config is still checked against the weights
    (target / "config.json").write_text(json.dumps({**CONFIG.to_dict(), "num_layers": 3}))
    with pytest.raises(ValueError, match=r"missing keys \(12\): transformer.layers.2.input_layernorm.weight"):
        load_checkpoint(target)
    (target / "config.json").write_text(json.dumps({**CONFIG.to_dict(), "heads": 3}))
    with pytest.raises(ValueError, match="config.json is not a valid GLMConfig .*unknown GLMConfig field"):
        load_checkpoint(target)
    (target / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not a valid GLMConfig"):
        load_checkpoint(target)


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", [-5, 1000, 40])  # in the weights, the middle, the safetensors header
def test_flipped_bytes_in_the_weights_are_refused_naming_the_file(tmp_path, where):
    target = save_checkpoint(random_model(), tmp_path / "ckpt")
    flip_byte(target / "model.safetensors", where)
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors is damaged"):
        load_checkpoint(target)


def test_an_edited_head_count_is_refused_though_the_shapes_agree(tmp_path):
    model = random_model()  # hidden 16, 2 heads; 4 heads have exactly the same weight shapes
    target = save_checkpoint(model, tmp_path / "ckpt")
    edited = GLMConfig(**{**CONFIG.to_dict(), "num_heads": 4})
    with torch.device("meta"):
        assert {k: v.shape for k, v in GLMModel(edited).state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()}
    (target / "config.json").write_text(json.dumps(edited.to_dict(), indent=2) + "\n")
    with pytest.raises(ValueError, match=r"ckpt/config.json is damaged"):
        load_checkpoint(target)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unreadable_weights_name_the_file(tmp_path, damage):
    target = save_checkpoint(random_model(), tmp_path / "ckpt")
    (target / "manifest.json").unlink()  # without checksums the reader itself must name the file
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 50, "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors is damaged or not a safetensors file"):
        load_checkpoint(target)


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],
    lambda text: text.replace('"sha256"', '"sha"', 1),
    lambda text: "[]",
    lambda text: text.replace("config.json", "other.json"),
])
def test_a_damaged_manifest_is_refused(tmp_path, damage):
    target = save_checkpoint(random_model(), tmp_path / "ckpt")
    manifest = target / "manifest.json"
    manifest.write_text(damage(manifest.read_text()))
    with pytest.raises(ValueError, match=r"ckpt/manifest.json is damaged"):
        load_checkpoint(target)


def test_a_carried_tokenizer_is_covered_by_the_manifest(tmp_path):
    tokenizer = GLMTokenizer.train(default_corpus()[:5], 300)
    target = save_checkpoint(random_model(), tmp_path / "ckpt", tokenizer=tokenizer)
    assert checkpoint.checkpoint_metadata(target) == {"tokenizer_sha256": tokenizer.sha256}
    flip_byte(target / "tokenizer.json", 100)
    with pytest.raises(ValueError, match=r"ckpt/tokenizer.json is damaged"):
        load_checkpoint(target)


def test_metadata_is_saved_with_the_checkpoint(tmp_path):
    target = save_checkpoint(random_model(), tmp_path / "ckpt", metadata={"tokenizer_sha256": "ab" * 32})
    assert checkpoint.checkpoint_metadata(target) == {"tokenizer_sha256": "ab" * 32}
    (target / "manifest.json").unlink()
    assert checkpoint.checkpoint_metadata(target) == {}


# ---------------------------------------------------------------------------------------------
# The authors' layouts


def test_export_uses_exactly_the_authors_keys():
    model = random_model()
    exported = export_authors_state_dict(model)
    assert sorted(exported) == sorted(spec_keys(CONFIG.num_layers))
    assert exported["transformer.position_embeddings.weight"].shape == (CONFIG.max_sequence_length + 1, 16)


def test_export_then_import_is_exact():
    model = random_model()
    imported = import_authors_checkpoint(export_authors_state_dict(model), CONFIG)
    assert_same_weights(imported, model)
    assert_same_logits(imported, model)


def authors_training_file(state, path):
    """What the authors' save_checkpoint writes (iteration, module, plain-type extras)."""
    torch.save({"iteration": 1000, "module": state, "random_rng_state": (3, (1, 2), None)}, path)


def hf_file(state, path, lm_head=False):
    """The Hugging Face port: every key prefixed with ``glm.``."""
    sd = {f"glm.{k}": v for k, v in state.items()}
    if lm_head:
        sd["lm_head.weight"] = state["word_embeddings.weight"].clone()
    torch.save(sd, path)


@pytest.mark.parametrize(
    "layout",
    ["module-file", "module-dir", "tracker-dir", "hf-file", "hf-dir", "hf-lm-head", "hf-sharded", "module-dict",
     "hf-dict"],
)
def test_import_every_layout(tmp_path, layout):
    model = random_model()
    state = export_authors_state_dict(model)
    if layout == "module-file":
        source = tmp_path / "weights.pt"
        authors_training_file(state, source)
    elif layout == "module-dir":
        source = tmp_path
        authors_training_file(state, tmp_path / "mp_rank_00_model_states.pt")
    elif layout == "tracker-dir":
        source = tmp_path
        (tmp_path / "latest_checkpointed_iteration.txt").write_text("250000\n")
        (tmp_path / "250000").mkdir()
        authors_training_file(state, tmp_path / "250000" / "mp_rank_00_model_states.pt")
    elif layout in ("hf-file", "hf-lm-head"):
        source = tmp_path / "pytorch_model.bin"
        hf_file(state, source, lm_head=layout == "hf-lm-head")
    elif layout == "hf-dir":
        source = tmp_path
        hf_file(state, tmp_path / "pytorch_model.bin")
    elif layout == "hf-sharded":
        source = tmp_path
        keys = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[:7], "pytorch_model-00002-of-00002.bin": keys[7:]}
        for name, part in shards.items():
            torch.save({f"glm.{k}": state[k] for k in part}, tmp_path / name)
        weight_map = {f"glm.{k}": name for name, part in shards.items() for k in part}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif layout == "module-dict":
        source = {"module": state, "iteration": 3}
    else:
        source = {f"glm.{k}": v for k, v in state.items()}
    imported = import_authors_checkpoint(source, CONFIG)
    assert_same_weights(imported, model)


def test_untied_output_weights_are_refused():
    state = {f"glm.{k}": v for k, v in export_authors_state_dict(random_model()).items()}
    state["lm_head.weight"] = state["glm.word_embeddings.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from word_embeddings.weight"):
        import_authors_checkpoint(state, CONFIG)


def test_save_authors_checkpoint_round_trip(tmp_path):
    model = random_model(dtype=torch.float16)
    written = save_authors_checkpoint(model, tmp_path)
    assert written == tmp_path / "mp_rank_00_model_states.pt"
    content = torch.load(written, weights_only=True)
    assert list(content) == ["module"] and sorted(content["module"]) == sorted(spec_keys(CONFIG.num_layers))
    assert_same_weights(import_authors_checkpoint(tmp_path, CONFIG), model)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_authors_checkpoint(random_model(), written)
    other = random_model()
    save_authors_checkpoint(other, written, overwrite=True)
    assert_same_weights(import_authors_checkpoint(tmp_path, CONFIG), other)
    assert leftovers(tmp_path) == []


def test_mismatched_keys_are_named():
    state = export_authors_state_dict(random_model())
    del state["transformer.layers.0.attention.dense.bias"]
    state["transformer.layers.0.attention.rotary.inv_freq"] = torch.zeros(4)
    state["transformer.layers.1.mlp.dense_h_to_4h.weight"] = torch.zeros(64, 17)
    state["transformer.final_layernorm.bias"] = [0.0] * 16
    with pytest.raises(ValueError) as info:
        import_authors_checkpoint(state, CONFIG)
    message = str(info.value)
    assert "missing keys (1): transformer.layers.0.attention.dense.bias" in message
    assert "unexpected keys (1): transformer.layers.0.attention.rotary.inv_freq" in message
    assert "mis-shaped keys (1): transformer.layers.1.mlp.dense_h_to_4h.weight [64, 17] (expected [64, 16])" in message
    assert "not tensors (1): transformer.final_layernorm.bias" in message


def test_a_wrong_config_names_the_mismatch():
    state = export_authors_state_dict(random_model())
    wider = GLMConfig(**{**CONFIG.to_dict(), "vocab_size": 128})
    with pytest.raises(ValueError, match=r"word_embeddings.weight \[64, 16\] \(expected \[128, 16\]\)"):
        import_authors_checkpoint(state, wider)


def test_pickled_objects_are_refused_with_weights_only(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": export_authors_state_dict(random_model()), "np_rng_state": np.random.get_state()}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*If you trust the file"):
        import_authors_checkpoint(path, CONFIG)


@pytest.mark.parametrize("content", [b"some notes\n", b"", b"PK\x03\x04 not really a zip", b"\x80\x02garbage"])
def test_foreign_files_are_refused_in_one_line(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"notes.txt is not a PyTorch checkpoint") as info:
        import_authors_checkpoint(path, CONFIG)
    assert "weights_only=False" not in str(info.value)


def test_missing_files():
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        import_authors_checkpoint(os.path.dirname(__file__), CONFIG)


# ---------------------------------------------------------------------------------------------
# glm-ext convert


def test_convert_both_ways(tmp_path, capsys):
    config = GLMConfig.preset("tiny", vocab_size=200)
    model = random_model(config)
    save_authors_checkpoint(model, tmp_path / "authors.pt")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.to_dict()))

    assert cli_main(["convert", str(tmp_path / "authors.pt"), str(tmp_path / "ours"), "--config", str(config_file)]) == 0
    assert "authors' layout" in capsys.readouterr().out
    assert_same_weights(load_checkpoint(tmp_path / "ours"), model)

    assert cli_main(["convert", str(tmp_path / "ours"), str(tmp_path / "back.pt"), "--to", "authors"]) == 0
    assert_same_weights(import_authors_checkpoint(tmp_path / "back.pt", config), model)


def test_convert_with_a_preset_and_errors(tmp_path, capsys):
    model = random_model(GLMConfig.preset("tiny"))
    save_authors_checkpoint(model, tmp_path / "a.pt")
    assert cli_main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "ours"), "--preset", "tiny"]) == 0
    assert_same_weights(load_checkpoint(tmp_path / "ours"), model)

    assert cli_main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "x")]) == 2
    assert "needs --preset NAME or --config JSON" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "ours"), str(tmp_path / "x"), "--preset", "tiny"]) == 2
    assert "drop --preset/--config" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "x"), "--preset", "base"]) == 1
    assert "mis-shaped keys" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_convert_never_overwrites_without_overwrite(tmp_path, capsys):
    model, other = random_model(GLMConfig.preset("tiny")), random_model(GLMConfig.preset("tiny"))
    ours = save_checkpoint(model, tmp_path / "ours")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert cli_main(["convert", str(ours), str(notes), "--to", "authors"]) == 1
    assert "notes.txt already exists; pass --overwrite" in capsys.readouterr().err
    assert notes.read_text() == "my notes"
    assert cli_main(["convert", str(ours), str(notes), "--to", "authors", "--overwrite"]) == 0
    assert_same_weights(import_authors_checkpoint(notes, model.config), model)

    save_authors_checkpoint(other, tmp_path / "other.pt")
    assert cli_main(["convert", str(tmp_path / "other.pt"), str(ours), "--preset", "tiny"]) == 1
    assert "ours already exists; pass --overwrite" in capsys.readouterr().err
    assert_same_weights(load_checkpoint(ours), model)
    assert cli_main(["convert", str(tmp_path / "other.pt"), str(ours), "--preset", "tiny", "--overwrite"]) == 0
    assert_same_weights(load_checkpoint(ours), other)
    (tmp_path / "empty").mkdir()
    assert cli_main(["convert", str(ours), str(tmp_path / "empty")]) == 0  # an empty directory holds nothing


def test_convert_a_text_file_is_one_line(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("just some text\n")
    assert cli_main(["convert", str(tmp_path / "text.txt"), str(tmp_path / "x"), "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "text.txt is not a PyTorch checkpoint" in err


# ---------------------------------------------------------------------------------------------
# glm-ext convert --tokenizer-files: a checkpoint that carries its tokenizer


def tokenizer_files(family, folder):
    """Small files of ``family`` written in the test, as --tokenizer-files takes them."""
    if family == "wordpiece":
        return [write_wordpiece_vocab(folder)]
    if family in ("roberta", "gpt2"):
        return list(write_bpe_files(folder, roberta=family == "roberta")[:2])
    pytest.importorskip("sentencepiece")
    return [train_sentencepiece(folder, default_corpus()[:20])]


def authors_checkpoint(folder, vocab_size):
    """An authors'-layout checkpoint of a small random model, with its config as a JSON file."""
    config = GLMConfig(vocab_size=vocab_size, hidden_size=16, num_layers=2, num_heads=2, max_sequence_length=64)
    model = random_model(config)
    save_authors_checkpoint(model, folder / "authors.pt")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return model, str(folder / "authors.pt"), str(folder / "config.json")


@pytest.mark.parametrize("family, text", [
    ("wordpiece", "the cat [MASK] on the mat."),
    ("roberta", "the cat [MASK] the [sMASK]"),
    ("gpt2", " the cat [MASK] the [gMASK]"),
    ("chinese-sp", "清华大学位于[MASK]。"),
])
def test_a_converted_checkpoint_with_each_tokenizer_family_generates(tmp_path, capsys, family, text):
    files = [str(path) for path in tokenizer_files(family, tmp_path)]
    tokenizer = GLMTokenizer.from_files(family, files)
    model, authors, config = authors_checkpoint(tmp_path, tokenizer.padded_vocab_size)
    out = tmp_path / "converted"
    argv = ["convert", authors, str(out), "--config", config, "--tokenizer-files", *files, "--tokenizer-family", family]
    assert cli_main(argv) == 0
    assert f"with its tokenizer ({tokenizer.vocab_size} tokens)" in capsys.readouterr().out
    carried = GLMTokenizer.from_file(out / "tokenizer.json")
    assert carried.special_ids == tokenizer.special_ids and carried.sha256 == tokenizer.sha256
    assert resolve_model_source(out) == (out, out / "tokenizer.json")

    assert cli_main(["generate", str(out), text, "--max-new-tokens", "3"]) == 0
    expected = fill_blanks(model, tokenizer, text, max_new_tokens=3)
    printed = capsys.readouterr().out
    assert len(expected.blanks) == printed.count("blank ") >= 1
    for i, blank in enumerate(expected.blanks, 1):
        assert f"blank {i}: {blank.text!r}" in printed

    # Converting again into the same directory needs --overwrite; a glm_ext source passes its tokenizer on.
    assert cli_main(argv) == 1 and "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main([*argv, "--overwrite"]) == 0
    assert cli_main(["convert", str(out), str(tmp_path / "again")]) == 0
    assert GLMTokenizer.from_file(tmp_path / "again" / "tokenizer.json").sha256 == tokenizer.sha256


def test_convert_tokenizer_errors(tmp_path, capsys):
    vocab_txt = str(write_wordpiece_vocab(tmp_path))
    vocab_json, merges_txt = (str(path) for path in write_bpe_files(tmp_path / "bpe", roberta=True)[:2])
    _, authors, config = authors_checkpoint(tmp_path, 256)  # the WordPiece test vocabulary needs 128 rows
    out = str(tmp_path / "out")

    def fails(status, message, *args):
        assert cli_main(["convert", *args]) == status
        assert message in capsys.readouterr().err
        assert not os.path.exists(out)

    fails(1, "the tokenizer has 36 tokens (128 rows once padded to a multiple of 128) but the checkpoint's word "
             "embedding has 256 rows", authors, out, "--config", config, "--tokenizer-files", vocab_txt,
          "--tokenizer-family", "wordpiece")
    fails(1, "the roberta tokenizer is built from 2 file(s) (vocab.json merges.txt), got 1",
          authors, out, "--config", config, "--tokenizer-files", vocab_json, "--tokenizer-family", "roberta")
    fails(1, "merges_file", authors, out, "--config", config, "--tokenizer-files", vocab_json,
          str(tmp_path / "missing.txt"), "--tokenizer-family", "roberta")
    fails(1, "--tokenizer-files needs --tokenizer-family NAME", authors, out, "--config", config,
          "--tokenizer-files", vocab_txt)
    # A preset names the family its checkpoint was trained with; files or a family that do not fit it are refused
    # before the weights are read.
    fails(1, "the wordpiece tokenizer is built from 1 file(s) (vocab.txt), got 2",
          authors, out, "--preset", "large", "--tokenizer-files", vocab_json, merges_txt)
    fails(1, "--tokenizer-family roberta does not fit --preset large, which the authors trained with the "
             "wordpiece tokenizer", authors, out, "--preset", "large", "--tokenizer-files", vocab_json, merges_txt,
          "--tokenizer-family", "roberta")
    fails(2, "the authors' layout holds no tokenizer", authors, out, "--config", config, "--to", "authors",
          "--tokenizer-files", vocab_txt, "--tokenizer-family", "wordpiece")
    fails(2, "--tokenizer-family needs --tokenizer-files", authors, out, "--config", config,
          "--tokenizer-family", "wordpiece")
