"""The data side of finetuning: the authors' SuperGLUE training examples, the seq2seq files in the
authors' layouts, the data order and how a step is shared out, the training losses against direct
computations, and ROUGE against rouge-score called directly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from rouge_score import rouge_scorer

from glm_ext.data.steps import StepLayout
from glm_ext.generation import GENERATION_PRESETS
from glm_ext.tasks.cloze import cloze_loss
from glm_ext.tasks.finetune import ClozeFinetuning, ClozeSettings, ExampleOrder, settings_from_dict, settings_to_dict
from glm_ext.tasks.metrics import rouge
from glm_ext.tasks.seq2seq import Seq2SeqLayout
from glm_ext.tasks.seq2seq_data import read_seq2seq
from glm_ext.tasks.superglue import superglue_task
from tasks_testing import blank_input, direct_log_probs, one_thread, random_model, small_tokenizer  # noqa: F401


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def training(task_name, tmp_path, records):
    return superglue_task(task_name).read(write_jsonl(tmp_path / "train.jsonl", records), training=True)


# ---------------------------------------------------------------------------------------------
# The authors' training examples (tasks/superglue/dataset.py)


def test_copa_trains_on_each_record_and_its_mirror(tmp_path):
    record = {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He laughed.", "question": "cause",
              "label": 0}
    original, mirrored = training("copa", tmp_path, [record])
    assert original.candidates == (" he slipped", " he laughed") and original.target == 0
    assert mirrored.candidates == (" he laughed", " he slipped") and mirrored.target == 1
    assert superglue_task("copa").read(tmp_path / "train.jsonl") == [original]  # evaluation: no mirror


def test_record_trains_on_each_answer_against_at_most_nine_other_entities(tmp_path):
    names = [f"Name{i}" for i in range(14)]
    text = " ".join(names) + "."
    entities, start = [], 0
    for name in names:
        entities.append({"start": start, "end": start + len(name) - 1})
        start += len(name) + 1
    record = {"idx": 0, "passage": {"text": text, "entities": entities},
              "qas": [{"idx": 0, "query": "@placeholder won.", "answers": [{"text": "Name3"}, {"text": "Name7"}]}]}
    examples = training("record", tmp_path, [record])
    assert [x.candidates[0] for x in examples] == [" Name3", " Name7"]
    for x in examples:
        wrong = x.choices[1:]
        assert x.target == 0 and len(wrong) == 9 and len(set(wrong)) == 9
        assert set(wrong) <= set(names) - {"Name3", "Name7"}
    assert examples == training("record", tmp_path, [record])  # drawn the same way every time
    evaluation = superglue_task("record").read(tmp_path / "train.jsonl")
    assert len(evaluation) == 1 and len(evaluation[0].candidates) == 14

    few = {**record, "passage": {"text": text, "entities": entities[:5]},
           "qas": [{"idx": 0, "query": "@placeholder won.", "answers": [{"text": "Name1"}]}]}
    (example,) = training("record", tmp_path, [few])
    assert example.choices == ("Name1", "Name0", "Name2", "Name3", "Name4")  # every other entity, in order
    with pytest.raises(ValueError, match="train.jsonl:1: a ReCoRD training record needs the answers"):
        training("record", tmp_path, [{**few, "qas": [{"idx": 0, "query": "@placeholder won."}]}])


def test_wsc_trains_on_true_records_with_chunks_of_nine_candidates(tmp_path):
    base = {"text": "Mark told Pete he was late.", "target": {"span1_text": "Pete", "span1_index": 2,
                                                               "span2_text": "he", "span2_index": 3}}
    others = [f"person {i}" for i in range(20)]
    examples = training("wsc", tmp_path, [
        {**base, "label": False, "candidates": [{"text": "Mark"}]},
        {**base, "label": True, "candidates": [{"text": c} for c in others + others[:2]]},  # repeats go
        {**base, "label": True},
    ])
    assert [x.candidates[0] for x in examples] == [" Pete"] * 4 and all(x.target == 0 for x in examples)
    chunks = [[c[1:] for c in x.candidates[1:]] for x in examples[:3]]
    assert chunks == [others[:9], others[9:18], others[18:] + others[:7]]
    assert examples[3].candidates == (" Pete",)
    assert superglue_task("wsc").training_loss == "mix"
    assert len(superglue_task("wsc").read(tmp_path / "train.jsonl")) == 3  # evaluation keeps every record


def test_cloze_loss_kinds_against_direct_formulas():
    scores = torch.tensor([[-1.0, -2.5, float("-inf")], [-0.3, -0.1, -4.0]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    cross_entropy = [-(scores[0, 0] - torch.logsumexp(scores[0, :2], 0)), -(scores[1, 2] - torch.logsumexp(scores[1], 0))]
    assert float(cloze_loss(scores, targets)) == pytest.approx(float(sum(cross_entropy) / 2))
    mix = [cross_entropy[0] - scores[0, 0], cross_entropy[1] - scores[1, 2]]
    assert float(cloze_loss(scores, targets, "mix")) == pytest.approx(float(sum(mix) / 2))
    weighted = cloze_loss(scores, targets, "mix", weights=torch.tensor([1, 0]), normalizer=4.0)
    assert float(weighted) == pytest.approx(float(mix[0] / 4))
    with pytest.raises(ValueError, match="kind must be one of cross_entropy, mix"):
        cloze_loss(scores, targets, "hinge")


# ---------------------------------------------------------------------------------------------
# The cloze training step against candidates scored one by one


def test_cloze_training_loss_equals_candidates_scored_alone(tmp_path):
    tokenizer = small_tokenizer()
    model = random_model(tokenizer)
    records = [{"premise": "The while statement is used.", "choice1": "It was great.",
                "choice2": "It was terrible.", "question": "effect", "label": 1},
               {"premise": "A break statement ends the loop.", "choice1": "The loop ends.",
                "choice2": "The if statement is true.", "question": "cause", "label": 0}]
    settings = ClozeSettings(task="copa", train=write_jsonl(tmp_path / "copa.jsonl", records))
    task = ClozeFinetuning(settings, tokenizer, max_sequence_length=128)
    (batch,) = task.next_batches(StepLayout(micro_batch_size=4), torch.device("cpu"))  # both records and mirrors
    loss = task.loss(task.forward(model, batch), batch, torch.tensor(4.0, dtype=torch.float64))

    special = tokenizer.special_ids
    first_step = ExampleOrder(4, seed=0).take(4)
    expected = 0.0
    for e in range(4):
        example = task.train[first_step[e]]
        scores = []
        for answer in example.answers:  # the candidate's tokens and <eop>, decoded alone in the blank
            ids, positions, blocks, sep = blank_input(example.part_a, [special.sop, *answer[:-1]], example.mask_index)
            log_probs = direct_log_probs(model, ids, positions, blocks, sep)
            scores.append(sum(log_probs[sep + i, token] for i, token in enumerate(answer)))
        expected += -torch.log_softmax(torch.stack(scores), 0)[example.target]
    assert loss.item() == pytest.approx(float(expected) / 4, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Data order, the shares of a step, settings


def test_example_order_visits_every_example_once_an_epoch_and_resumes():
    order = ExampleOrder(7, seed=3)
    first = order.take(5) + order.take(5)  # crosses into epoch 1
    assert sorted(first[:7]) == list(range(7)) and order.epoch == 1 and order.position == 3
    again = ExampleOrder(7, seed=3)
    again.load_state_dict(order.state_dict())
    assert again.take(11) == order.take(11)
    assert ExampleOrder(7, seed=4).take(7) != ExampleOrder(7, seed=3).take(7)
    with pytest.raises(ValueError, match="had 7 examples, this file gives 8"):
        ExampleOrder(8, seed=3).load_state_dict(order.state_dict())


def test_a_step_is_shared_out_as_its_examples_in_order(tmp_path):
    tokenizer = small_tokenizer()
    records = [{"text": f"It was {i}.", "label": "great" if i % 2 else "terrible"} for i in range(10)]
    settings = ClozeSettings(task="custom", train=write_jsonl(tmp_path / "data.jsonl", records),
                             pattern="{text} It was [MASK].", verbalizer={"great": "great", "terrible": "terrible"})

    def two_steps(world_size: int, grad_accum: int, rank: int) -> list[list[list[int]]]:
        """This rank's micro-batches (example indices) of the first two steps of 8 examples."""
        task = ClozeFinetuning(settings, tokenizer, max_sequence_length=128, seed=1)
        layout = StepLayout.for_global_batch(8, grad_accum=grad_accum, world_size=world_size, rank=rank)
        return [task.step_indices(layout) for _ in range(2)]

    alone = two_steps(1, 1, 0)
    ranks = [two_steps(2, 2, rank) for rank in range(2)]
    for step in range(2):  # the second step crosses into the second epoch
        assert [len(batch) for batch in ranks[0][step]] == [2, 2]
        assert sum(ranks[0][step] + ranks[1][step], []) == alone[step][0]


def test_settings_round_trip_through_json(tmp_path):
    cloze = ClozeSettings(task="boolq", train="t.jsonl", dev="d.jsonl", pattern_id=2, max_length=64)
    from glm_ext.tasks.finetune import Seq2SeqSettings

    seq2seq = Seq2SeqSettings(train="t.jsonl", layout=Seq2SeqLayout.for_task("xsum", target_length=20),
                              label_smoothing=0.1, generation={"num_beams": 3})
    for settings in (cloze, seq2seq):
        assert settings_from_dict(json.loads(json.dumps(settings_to_dict(settings)))) == settings
    with pytest.raises(ValueError, match="mode of cloze, seq2seq"):
        settings_from_dict({"train": "t.jsonl"})


# ---------------------------------------------------------------------------------------------
# Seq2seq files and settings


def test_cnn_dailymail_and_gigaword_line_files(tmp_path):
    (tmp_path / "val.source").write_text("Obama -LRB- D -RRB- said `` no '' . <S_SEP> He ca n't go .\n"
                                         "It \u2019s \u201cfine\u201d\n")
    (tmp_path / "val.target").write_text("Obama said no . <S_SEP> He ca n't .\nfine\n")
    first, second = read_seq2seq(tmp_path / "val.source", "cnn_dm")
    assert first.source == 'Obama ( D ) said " no " .  He can\'t go .'
    assert first.target == "Obama said no . [SEP] He can't ." and first.where.endswith("val.source:1")
    assert second.source == 'It\'s "fine"'
    as_is = read_seq2seq(tmp_path / "val.source", "summarization")  # another corpus: the text as it is
    assert as_is[0].source == "Obama -LRB- D -RRB- said `` no '' . <S_SEP> He ca n't go ."

    (tmp_path / "test.source").write_text("UNK rises -lrb- &amp; falls -rrb-\n")
    (tmp_path / "test.target").write_text("<unk> up\n")
    (example,) = read_seq2seq(tmp_path / "test.source", "gigaword")
    assert example.source == "[UNK] rises ( & falls )" and example.target == "[UNK] up"


def test_xsum_split_file_and_summaries(tmp_path):
    split = {"train": ["1", "2"], "validation": ["3"], "test": []}
    (tmp_path / "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json").write_text(json.dumps(split))
    for name in ("1", "2", "3"):
        (tmp_path / f"{name}.summary").write_text(
            f"[SN]URL[SN]\nhttp://x/{name}\n\n[SN]TITLE[SN]\nTitle {name}\n\n[SN]FIRST-SENTENCE[SN]\nSummary {name}.\n\n"
            f"[SN]RESTBODY[SN]\nBody {name} line one.\n\nBody line two.\n")
    path = tmp_path / "XSum-TRAINING-DEV-TEST-SPLIT-90-5-5.json"
    train = read_seq2seq(path, "xsum", split="train")
    assert [(x.source, x.target) for x in train] == [("Body 1 line one. Body line two.", "Summary 1."),
                                                     ("Body 2 line one. Body line two.", "Summary 2.")]
    assert [x.target for x in read_seq2seq(path, "xsum", split="validation")] == ["Summary 3."]
    with pytest.raises(ValueError, match="holds no examples"):
        read_seq2seq(path, "xsum", split="test")
    (tmp_path / "2.summary").write_text("[SN]FIRST-SENTENCE[SN]\nOnly a summary.\n")
    with pytest.raises(ValueError, match=r"2.summary: no \[SN\]RESTBODY\[SN\] section"):
        read_seq2seq(path, "xsum", split="train")
    with pytest.raises(ValueError, match="SQuAD's .* or XSum's split file"):
        read_seq2seq(path, "summarization")


def test_squad_question_generation_files(tmp_path):
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "a", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12},
                                                               {"text": "France", "answer_start": 12},
                                                               {"text": "in France", "answer_start": 9}]}]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(squad))
    examples = read_seq2seq(tmp_path / "dev.json", "squad_generation")
    assert [(x.answer, x.target, x.source) for x in examples] == [
        ("France", "Where is Paris?", "Paris is in France."), ("in France", "Where is Paris?", "Paris is in France.")]
    lines = write_jsonl(tmp_path / "qg.jsonl", [{"context": "Paris is in France.", "answer": "France",
                                                 "question": "Where is Paris?"}])
    assert read_seq2seq(lines, "squad_generation") == [dataclasses.replace(examples[0], where=f"{lines}:1")]
    bad = {"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q"}]}]}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="field 'data.0.paragraphs.0.qas.0.answers' is missing"):
        read_seq2seq(tmp_path / "bad.json", "squad_generation")
    with pytest.raises(ValueError, match="field 'answer' is missing"):
        read_seq2seq(write_jsonl(tmp_path / "no_answer.jsonl", [{"context": "c", "question": "q"}]),
                     "squad_generation")
    with pytest.raises(ValueError, match="unknown seq2seq task 'squad'"):
        read_seq2seq(lines, "squad")


def test_task_decoding_settings():
    cnn_dm = Seq2SeqLayout.for_task("cnn_dm")
    assert (cnn_dm.source_length, cnn_dm.target_length) == (608, 160)
    preset = GENERATION_PRESETS["cnn_dailymail"]  # the generation module's preset of the same scripts
    assert cnn_dm.decoding() == {name: getattr(preset, name) for name in cnn_dm.decoding()}
    short = Seq2SeqLayout.for_task("cnn_dm", target_length=20)
    assert short.decoding()["min_new_tokens"] == 20 and short.decoding({"min_new_tokens": 5})["min_new_tokens"] == 5
    greedy = short.decoding({"num_beams": 1})
    assert "length_penalty" not in greedy and greedy["num_beams"] == 1
    with pytest.raises(ValueError, match="mask_token must be one of"):
        Seq2SeqLayout("summarization", 10, 5, "[mask]")


def test_rouge_against_rouge_score_called_directly():
    predictions = ["the cats sat on mats [SEP] a dog ran", "nothing alike"]
    references = ["The cat sat on the mat. [SEP] The dog ran away.", "something else entirely"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score("The cat sat on the mat.\nThe dog ran away.", "the cats sat on mats\na dog ran"),
              scorer.score("something else entirely", "nothing alike")]
    got = rouge(predictions, references)
    for name, kind in (("rouge1", "rouge1"), ("rouge2", "rouge2"), ("rougeL", "rougeLsum")):
        assert got[name] == pytest.approx(100 * sum(d[kind].fmeasure for d in direct) / 2)
    # By hand: 7 of the prediction's 8 words are the reference's 10 (stemmed: cats ~ cat, mats ~ mat).
    precision, recall = 7 / 8, 7 / 10
    assert got["rouge1"] == pytest.approx(100 * (2 * precision * recall / (precision + recall)) / 2)
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        rouge(predictions, references[:1])
