"""``glm-ext finetune cloze|seq2seq`` and ``glm-ext evaluate seq2seq`` end to end, on a tiny GLM
pretrained on the bundled corpus (about 15 s, once for the module).

* cloze: a synthetic task built from the corpus (which of two words a stretch of text holds; chance
  50%) is learnt well above chance, and ``best/`` and the last checkpoint score under ``glm-ext
  evaluate cloze`` what ``metrics.jsonl`` recorded for them;
* a finetuning run stopped by SIGINT and run again ends with the weights, losses and dev metrics of
  the run that was not stopped (dropout on: the masks are the same too);
* seq2seq: the training loss is the label-smoothed cross-entropy of Part B's target tokens alone,
  computed here directly; ``evaluate seq2seq`` decodes what beam search on sources built here from
  GLM_SPEC 6.1 decodes, and prints the ROUGE of rouge-score on those predictions;
* an authors' checkpoint converted with its tokenizer is finetuned by the same commands;
* bad files and settings end in one clear error line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from finetune_testing import KEYWORDS, TINY_MODEL, keyword_records, pretrain, write_jsonl
from glm_ext.checkpoint import checkpoint_metadata, load_checkpoint, save_authors_checkpoint
from glm_ext.cli import main
from glm_ext.generation import GenerationConfig, fill_blanks
from glm_ext.metrics import read_metrics
from glm_ext.model import GLMConfig, GLMModel
from glm_ext.run_dir import RunDirectory
from glm_ext.tasks.finetune import Seq2SeqFinetuning, Seq2SeqSettings
from glm_ext.tasks.seq2seq import Seq2SeqLayout
from glm_ext.tokenizer import GLMTokenizer
from glm_ext.training import TrainConfig, Trainer
from tasks_testing import one_thread  # noqa: F401
from tokenizer_files import write_bpe_files

DEV_SIZE = 160
CLOZE_TASK = ["--task", "custom", "--pattern", "{text} Which word does it use? [MASK].",
              *[item for word in KEYWORDS for item in ("--verbalizer", f"{word}={word}")]]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="module")
def keyword_files(tmp_path_factory):
    """(train, dev) JSON-lines files of the synthetic cloze task, and the same as seq2seq data."""
    folder = tmp_path_factory.mktemp("keywords")
    records = keyword_records()
    dev, train = records[:DEV_SIZE], records[DEV_SIZE:]
    as_seq2seq = [{"source": r["text"], "target": r["label"]} for r in records]
    return {
        "train": write_jsonl(folder / "train.jsonl", train), "dev": write_jsonl(folder / "dev.jsonl", dev),
        "s2s_train": write_jsonl(folder / "s2s_train.jsonl", as_seq2seq[DEV_SIZE:]),
        "s2s_dev": write_jsonl(folder / "s2s_dev.jsonl", as_seq2seq[:12]),
    }


def finetune(*arguments) -> int:
    return main(["finetune", *map(str, arguments), "--device", "cpu"])


def evaluated(capsys, *arguments) -> dict:
    """The metrics ``glm-ext evaluate ... --output`` writes."""
    output = arguments[-1]
    assert main(["evaluate", *map(str, arguments[:-1]), "--device", "cpu", "--output", str(output)]) == 0, \
        capsys.readouterr().err
    return json.loads(output.read_text())["metrics"]


# ---------------------------------------------------------------------------------------------
# Cloze


def test_cloze_finetuning_beats_chance_clearly(pretrained, keyword_files, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune("cloze", pretrained, *CLOZE_TASK, "--train", keyword_files["train"], "--dev", keyword_files["dev"],
                    "--output-dir", run, "--steps", 200, "--batch-size", 16, "--lr", "2e-3", "--warmup", 10,
                    "--dropout", 0, "--eval-every", 50, "--log-every", 25) == 0
    out = capsys.readouterr().out
    before = float(out.split("held-out loss at step 0: ")[1].split("| accuracy ")[1].split()[0])
    evaluations = [r for r in read_metrics(run) if "dev_accuracy" in r]
    assert [r["step"] for r in evaluations] == [50, 100, 150, 200]
    after = evaluations[-1]["dev_accuracy"]
    # Chance is 50% (as many texts of each label); its standard error over the dev set is 3.95 points.
    chance, standard_error = 50.0, 100 * math.sqrt(0.25 / DEV_SIZE)
    threshold = chance + 4 * standard_error
    print(f"dev accuracy: {before:.1f}% before finetuning, {after:.1f}% after 200 steps "
          f"(chance {chance:.0f}%, 4 standard errors above it: {threshold:.1f}%)")
    assert before < threshold <= after

    # best/ holds the model of the best dev accuracy, and glm-ext evaluate scores it the same way.
    best = max(evaluations, key=lambda r: r["dev_accuracy"])
    metadata = checkpoint_metadata(run / "best")
    assert metadata["metric"] == "dev_accuracy" and metadata["value"] == best["dev_accuracy"]
    assert metadata["step"] == min(r["step"] for r in evaluations if r["dev_accuracy"] == best["dev_accuracy"])
    arguments = ["--data", keyword_files["dev"], *CLOZE_TASK]
    scored = evaluated(capsys, "cloze", run / "best", *arguments, tmp_path / "best.json")
    assert scored["accuracy"] == pytest.approx(best["dev_accuracy"])
    scored = evaluated(capsys, "cloze", run, *arguments, tmp_path / "last.json")
    assert scored["accuracy"] == pytest.approx(after)
    settings = json.loads((run / "finetune_config.json").read_text())
    assert settings["mode"] == "cloze" and settings["pretrained"] == str(pretrained.absolute())


def test_finetuning_resumes_exactly_after_a_stop(pretrained, keyword_files, tmp_path, monkeypatch, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [json.loads(line) for line in
                                                  open(keyword_files["train"]).readlines()[:40]])
    dev = write_jsonl(tmp_path / "dev.jsonl", [json.loads(line) for line in open(keyword_files["dev"]).readlines()[:16]])

    def run(directory) -> int:  # dropout stays at finetuning's default, 0.1
        return finetune("cloze", pretrained, *CLOZE_TASK, "--train", train, "--dev", dev, "--output-dir", directory,
                        "--steps", 8, "--batch-size", 4, "--lr", "1e-3", "--dtype", "float64", "--log-every", 1,
                        "--eval-every", 2)

    assert run(tmp_path / "straight") == 0
    real_step = Trainer.train_step

    def step_then_interrupt(self, batches):
        loss = real_step(self, batches)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the run saves step 3 and ends
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    assert run(tmp_path / "split") == 0
    assert "stopped at step 3" in capsys.readouterr().out
    assert RunDirectory(tmp_path / "split").latest_checkpoint().name == "step-00000003"
    monkeypatch.undo()
    assert run(tmp_path / "split") == 0
    assert "resumed" in capsys.readouterr().out

    for name in ("straight", "split"):
        assert RunDirectory(tmp_path / name).latest_checkpoint().name == "step-00000008"
    weights = [load_checkpoint(RunDirectory(tmp_path / name).latest_checkpoint() / "model").state_dict()
               for name in ("straight", "split")]
    for key, value in weights[0].items():
        assert value.dtype == torch.float64 and torch.equal(value, weights[1][key]), key
    records = [[{k: v for k, v in r.items() if k not in ("wall_time", "tokens_per_second")}
                for r in read_metrics(tmp_path / name)] for name in ("straight", "split")]
    assert records[0] == records[1] and sum("dev_accuracy" in r for r in records[0]) == 4
    best = [checkpoint_metadata(tmp_path / name / "best") for name in ("straight", "split")]
    assert best[0] == best[1]


# ---------------------------------------------------------------------------------------------
# Seq2seq


def summarization_source(tokenizer, text: str, length: int) -> list[int]:
    """GLM_SPEC 6.1: [CLS] [MASK] " Content:" " " + article, cut and padded with [pad] to ``length``."""
    special = tokenizer.special_ids
    prompt = [special.cls, special.mask, *tokenizer.encode(" Content:")]
    ids = prompt + tokenizer.encode(" " + text)[: length - len(prompt)]
    return ids + [special.pad] * (length - len(ids))


def test_seq2seq_loss_in_finetuning_is_on_part_b_only(pretrained, keyword_files, tmp_path):
    tokenizer = GLMTokenizer.from_file(pretrained / "tokenizer.json")
    source_length, target_length, smoothing = 40, 6, 0.1
    settings = Seq2SeqSettings(train=keyword_files["s2s_train"], label_smoothing=smoothing,
                               layout=Seq2SeqLayout("summarization", source_length, target_length))
    task = Seq2SeqFinetuning(settings, tokenizer, max_sequence_length=128)
    config = TrainConfig(train_data=keyword_files["s2s_train"], tokenizer=str(pretrained / "tokenizer.json"),
                         output_dir=str(tmp_path / "run"), batch_size=4, steps=1, warmup=1, grad_clip=0.0,
                         dtype="float64", device="cpu")
    model = load_checkpoint(RunDirectory(pretrained).latest_checkpoint() / "model")
    trainer = Trainer(config, task=task, init_from=model, log=lambda line: None)
    (batch,) = trainer.next_batches()
    examples = [json.loads(line) for line in open(keyword_files["s2s_train"])]
    by_source = {tuple(summarization_source(tokenizer, x["source"], source_length)): x["target"] for x in examples}

    with torch.no_grad():
        logits = trainer.model(batch.input_ids, batch.position_ids, batch.sep)
    losses = []
    for row in range(4):
        target = tokenizer.encode(" " + by_source[tuple(batch.input_ids[row, :source_length].tolist())])
        target = (target + [tokenizer.special_ids.eop])[:target_length]
        # Part B starts at the padded source's end; its index i predicts target token i.
        log_probs = F.log_softmax(logits[row, source_length : source_length + len(target)], dim=-1)
        for i, token in enumerate(target):
            losses.append((1 - smoothing) * -log_probs[i, token] - smoothing * log_probs[i].mean())
    assert len(losses) < batch.input_ids.shape[1]  # Part A's positions are many more
    expected = torch.stack(losses).mean()
    assert float(trainer.train_step([batch])) == pytest.approx(float(expected), rel=1e-9)


def test_seq2seq_finetune_and_evaluate(pretrained, keyword_files, tmp_path, capsys):
    run = tmp_path / "run"
    decoding = ["--num-beams", 2, "--min-new-tokens", 1]
    assert finetune("seq2seq", pretrained, "--train", keyword_files["s2s_train"], "--dev", keyword_files["s2s_dev"],
                    "--output-dir", run, "--source-length", 48, "--target-length", 4, "--steps", 40,
                    "--batch-size", 16, "--lr", "1e-3", "--warmup", 4, "--eval-every", 20, "--log-every", 10,
                    "--dev-decode", 6, *decoding) == 0
    records = read_metrics(run)
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [20, 40]
    assert all({"eval_accuracy", "dev_rouge1", "dev_rouge2", "dev_rougeL"} <= set(r) for r in evaluations)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert checkpoint_metadata(run / "best")["metric"] == "dev_rouge1"
    capsys.readouterr()

    predictions = tmp_path / "predictions.jsonl"
    metrics = evaluated(capsys, "seq2seq", run / "best", "--data", keyword_files["s2s_dev"], *decoding,
                        "--predictions", predictions, tmp_path / "out.json")
    printed = capsys.readouterr().out
    assert "source 48 tokens, at most 4 new tokens" in printed  # the run's layout, read from the run
    got = [json.loads(line) for line in predictions.read_text().splitlines()]
    examples = [json.loads(line) for line in open(keyword_files["s2s_dev"])]
    assert [g["target"] for g in got] == [x["target"] for x in examples]

    # The same decoding by hand: sources built here, the authors' CNN/DailyMail beam search settings
    # (GLM_SPEC 5) with 2 beams, at least 1 and at most 4 tokens.
    model = load_checkpoint(run / "best")
    tokenizer = GLMTokenizer.from_file(run / "best" / "tokenizer.json")
    config = GenerationConfig(num_beams=2, length_penalty=0.7, no_repeat_ngram_size=3, min_new_tokens=1,
                              max_new_tokens=4)
    filled = fill_blanks(model, tokenizer, [summarization_source(tokenizer, x["source"], 48) for x in examples],
                         config, add_eos=False)
    expected = [tokenizer.decode(result.blanks[0].token_ids).strip() for result in filled]
    assert [g["prediction"] for g in got] == expected

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    scores = [scorer.score(x["target"], p) for x, p in zip(examples, expected)]
    for name, kind in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rougeLsum")):
        mean = 100 * sum(s[kind].fmeasure for s in scores) / len(scores)
        assert metrics[name] == pytest.approx(mean)
        assert f"{name}: {mean:.2f}" in printed


# ---------------------------------------------------------------------------------------------
# An authors' checkpoint, converted with its tokenizer


def test_finetune_a_converted_authors_checkpoint(tmp_path, capsys):
    files = [str(path) for path in write_bpe_files(tmp_path / "gpt2", roberta=False)[:2]]
    tokenizer = GLMTokenizer.from_files("gpt2", files)
    config = GLMConfig(vocab_size=tokenizer.padded_vocab_size, hidden_size=16, num_layers=2, num_heads=2,
                       max_sequence_length=64)
    torch.manual_seed(0)
    save_authors_checkpoint(GLMModel(config), tmp_path / "mp_rank_00_model_states.pt")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    converted = tmp_path / "converted"
    assert main(["convert", str(tmp_path / "mp_rank_00_model_states.pt"), str(converted), "--config",
                 str(tmp_path / "config.json"), "--tokenizer-files", *files, "--tokenizer-family", "gpt2"]) == 0

    records = [{"text": "the cat sat", "label": "yes"}, {"text": "a cat", "label": "no"}] * 4
    data = write_jsonl(tmp_path / "cloze.jsonl", records)
    assert finetune("cloze", converted, "--task", "custom", "--pattern", "{text}? [MASK]", "--verbalizer", "yes=the",
                    "--verbalizer", "no=cat", "--train", data, "--dev", data, "--output-dir", tmp_path / "cloze",
                    "--steps", 3, "--batch-size", 4) == 0
    carried = GLMTokenizer.from_file(tmp_path / "cloze" / "best" / "tokenizer.json")
    assert carried.sha256 == tokenizer.sha256

    pairs = write_jsonl(tmp_path / "s2s.jsonl", [{"source": "the cat sat on the mat", "target": "the cat"}] * 4)
    assert finetune("seq2seq", converted, "--train", pairs, "--dev", pairs, "--output-dir", tmp_path / "s2s",
                    "--source-length", 40, "--target-length", 8, "--steps", 2, "--batch-size", 2) == 0
    metrics = evaluated(capsys, "seq2seq", tmp_path / "s2s" / "best", "--data", pairs, "--num-beams", 2,
                        tmp_path / "out.json")
    assert set(metrics) == {"rouge1", "rouge2", "rougeL"}


# ---------------------------------------------------------------------------------------------
# Errors


def test_bad_files_and_settings_end_in_one_clear_line(pretrained, keyword_files, tmp_path, capsys):
    boolq = ["cloze", pretrained, "--task", "boolq", "--output-dir", tmp_path / "run", "--steps", 1]

    def error(*arguments, status: int = 1) -> str:
        assert finetune(*arguments) == status
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    missing = write_jsonl(tmp_path / "missing.jsonl", [{"passage": "It was.", "label": True}])
    assert f"{missing}:1: field 'question' is missing" in error(*boolq, "--train", missing)
    (tmp_path / "empty.jsonl").write_text("")
    assert "holds no records (it is empty)" in error(*boolq, "--train", tmp_path / "empty.jsonl")
    unlabelled = write_jsonl(tmp_path / "unlabelled.jsonl", [{"passage": "It was.", "question": "was it"}])
    assert "a training example needs its label" in error(*boolq, "--train", unlabelled)
    assert "does not exist" in error(*boolq, "--train", tmp_path / "nowhere.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        finetune("cloze", pretrained, "--task", "sst2", "--train", missing)
    assert exit_info.value.code == 2 and "invalid choice: 'sst2'" in capsys.readouterr().err

    good = keyword_files["train"]
    assert "give --epochs or --steps, not both" in error("cloze", pretrained, *CLOZE_TASK, "--train", good,
                                                        "--epochs", 1, "--steps", 1)
    assert "holds the pretrained model" in error("cloze", pretrained, *CLOZE_TASK, "--train", good,
                                                 "--output-dir", pretrained)
    pretraining_run = tmp_path / "pretraining-run"
    shutil.copytree(pretrained, pretraining_run)
    assert "holds a training run that is not a finetuning one" in error(
        "cloze", pretrained, *CLOZE_TASK, "--train", good, "--output-dir", pretraining_run, "--steps", 1)
    assert finetune("cloze", pretrained, *CLOZE_TASK, "--train", good, "--output-dir", tmp_path / "done",
                    "--steps", 1) == 0
    capsys.readouterr()
    changed = [item if item != "{text} Which word does it use? [MASK]." else "{text} [MASK]" for item in CLOZE_TASK]
    assert "other task settings (pattern:" in error("cloze", pretrained, *changed, "--train", good,
                                                    "--output-dir", tmp_path / "done", "--steps", 2)

    overrides = [f"{name}={value}" for name, value in TINY_MODEL.items()]
    assert main(["train", "--data", str(pretrained.parent / "corpus"), "--tokenizer", str(pretrained / "tokenizer.json"),
                 "--output-dir", str(tmp_path / "done"),
                 "--model-overrides", *overrides, "--dropout", "0.1", "--steps", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and err.count("\n") == 1, err  # a finetuning run, not pretraining

    seq2seq = ["seq2seq", pretrained, "--output-dir", tmp_path / "s2s", "--steps", 1, "--source-length", 40,
               "--target-length", 8]
    no_target = write_jsonl(tmp_path / "no_target.jsonl", [{"source": "a text"}])
    assert f"{no_target}:1: field 'target' is missing" in error(*seq2seq, "--train", no_target)
    no_source = write_jsonl(tmp_path / "no_source.jsonl", [{"text": "a text", "target": "a"}])
    assert f"{no_source}:1: field 'source' is missing" in error(*seq2seq, "--train", no_source)
    no_question = write_jsonl(tmp_path / "no_question.jsonl", [{"context": "a text", "answer": "a"}])
    assert f"{no_question}:1: field 'question' is missing" in error(*seq2seq, "--task", "squad_generation",
                                                                   "--train", no_question)
    (tmp_path / "train.source").write_text("one\ntwo\n")
    assert "train.target, which does not exist" in error(*seq2seq, "--train", tmp_path / "train.source")
    (tmp_path / "train.target").write_text("one\n")
    assert "has 2 lines but" in error(*seq2seq, "--train", tmp_path / "train.source")
    assert "max_sequence_length is 128" in error(*seq2seq[:6], "--train", keyword_files["s2s_train"])  # CNN/DM's 608
    (tmp_path / "data.txt").write_text("a text\n")
    assert "a seq2seq data file is .jsonl" in error(*seq2seq, "--train", tmp_path / "data.txt")
