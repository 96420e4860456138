"""glm_ext.tasks.cloze: candidate scores against a slow oracle (each candidate run alone on its
full authors' row), truncation, the finetuning loss, tasks and their errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from glm_ext.tasks import cloze_task
from glm_ext.tasks.cloze import (
    BLANK,
    ClozeExample,
    ClozeResult,
    EncodedCloze,
    Text,
    build_cloze_batch,
    cloze_forward,
    cloze_loss,
    encode_cloze,
    evaluate_cloze,
    score_cloze,
    score_encoded,
)
from glm_ext.tasks.custom import custom_task, parse_verbalizer
from glm_ext.tasks.records import read_jsonl
from glm_ext.tasks.superglue import SUPERGLUE_TASKS, superglue_task
from tasks_testing import blank_input, direct_log_probs, one_thread, random_model, small_tokenizer  # noqa: F401


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def example(parts, candidates, target=0, parts_b=()):
    return ClozeExample(parts_a=tuple(parts), parts_b=tuple(parts_b), candidates=tuple(candidates),
                        choices=tuple(range(len(candidates))), label=target, target=target)


EXAMPLES = [
    # single-token candidates (every verbalizer is one token of the small vocabulary)
    ([Text("The while statement is used for", True), Text(" repeated execution. It was"), BLANK, Text(".")],
     [" great", " terrible"]),
    ([Text("Is the passage true?", True), BLANK, Text(".")], [" Yes", " No", " Maybe"]),
    # multi-token candidates of different lengths and counts
    ([Text('The "if" statement is used for', True), BLANK, Text(" execution.")],
     [" conditional", " repeated execution", " the loop without executing", " x"]),
    ([Text("A", True), BLANK, Text(" executed in the first suite terminates the loop.")],
     [' "break" statement', " while"]),
    ([Text("The elements of a sequence", True), Text(" such as a"), BLANK],
     [" string", " tuple or list", " sequence", " suite", " clause", " expression"]),
]


def oracle_scores(model, tokenizer, parts, candidates, multi_token, length_penalty=0.0):
    """Each candidate on its own full row (Part A as the authors build it, then Part B), one
    forward pass per candidate, no padding, no batching."""
    special = tokenizer.special_ids
    text = []
    for part in parts:
        text += [special.mask] if part is BLANK else tokenizer.encode(part.text)
    part_a = [special.cls, *text, special.eos]
    mask_index = part_a.index(special.mask)
    scores = []
    for candidate in candidates:
        answer = tokenizer.encode(candidate) + ([special.eop] if multi_token else [])
        inputs = [special.sop, *answer[:-1]] if multi_token else [special.sop]
        log_probs = direct_log_probs(model, *blank_input(part_a, inputs, mask_index))
        total = sum(log_probs[len(part_a) + i, token].item() for i, token in enumerate(answer))
        scores.append(total / len(answer) ** length_penalty)
    return scores


def is_multi_token(tokenizer, candidates):
    return any(len(tokenizer.encode(c)) != 1 for c in candidates)


@pytest.mark.parametrize("encoding", ["learned_2d", "rotary_2d"])
def test_label_scores_equal_each_candidate_run_alone(tokenizer, encoding):
    model = random_model(tokenizer, encoding=encoding)
    examples = [example(parts, candidates) for parts, candidates in EXAMPLES]
    multi = [is_multi_token(tokenizer, c) for _, c in EXAMPLES]
    assert multi == [False, False, True, True, True]
    expected = [oracle_scores(model, tokenizer, parts, candidates, m, 0.5 if m else 0.0)
                for (parts, candidates), m in zip(EXAMPLES, multi)]
    for share_context in (False, True, None):  # the authors' rows, a shared Part A, chosen per example
        for max_tokens in (1, 4096):  # every example alone, or all in one padded batch
            results = score_cloze(model, tokenizer, examples, max_tokens=max_tokens, share_context=share_context,
                                  length_penalty=0.5)
            for result, scores in zip(results, expected):
                torch.testing.assert_close(torch.tensor(result.scores, dtype=torch.float64),
                                           torch.tensor(scores, dtype=torch.float64), rtol=1e-9, atol=1e-9)
                assert len(set(result.scores)) == len(scores)  # the candidates are told apart


@pytest.mark.parametrize("share_context", [False, True])
def test_greedy_flags_say_whether_every_token_of_a_candidate_is_the_argmax(tokenizer, share_context):
    model = random_model(tokenizer)
    special = tokenizer.special_ids
    part_a = [special.cls, *tokenizer.encode('The "if" statement is used for'), special.mask,
              *tokenizer.encode("."), special.eos]
    mask_index = part_a.index(special.mask)

    def argmax_after(prefix):
        return int(direct_log_probs(model, *blank_input(part_a, [special.sop, *prefix], mask_index))[-1].argmax())

    greedy = [argmax_after([])]
    greedy.append(argmax_after(greedy))
    greedy.append(argmax_after(greedy))
    # Candidates as token ids (<eop> is the last answer token): the greedy chain, the chain with a
    # wrong last token, and one with a wrong first token.
    wrong = [t for t in range(10, 40) if t not in greedy]
    answers = (tuple(greedy), (*greedy[:2], wrong[0]), (wrong[1], *greedy[1:]))
    encoded = EncodedCloze(tuple(part_a), mask_index, answers, True, None, False)
    result = score_encoded(model, [encoded], special, share_context=share_context)[0]
    assert result.greedy == (True, False, False)
    single = EncodedCloze(tuple(part_a), mask_index, ((greedy[0],), (wrong[0],)), False, None, False)
    assert score_encoded(model, [single], special)[0].greedy == (True, False)


def test_truncation_cuts_the_last_shortenable_part_of_the_longer_segment(tokenizer):
    special = tokenizer.special_ids
    long_a = Text(" the loop without executing the else clause", True)
    long_b = Text(" used to iterate over the elements of a sequence", True)
    x = example([Text("A"), long_a, Text(" is"), BLANK], [" used", " the loop"], parts_b=[long_b, Text(".")])
    a_ids, b_ids = tokenizer.encode(long_a.text), tokenizer.encode(long_b.text)
    fixed = tokenizer.encode("A") + tokenizer.encode(" is") + [special.mask] + tokenizer.encode(".")
    answer = max(len(tokenizer.encode(c)) for c in x.candidates) + 1  # multi-token: with <eop>
    full = 2 + len(fixed) + len(a_ids) + len(b_ids) + answer
    encoded = encode_cloze(tokenizer, x, max_length=full, multi_token=True)
    assert not encoded.truncated and encoded.row_length == full

    # Cut 3 tokens: one at a time from whichever segment holds more shortenable tokens (B on ties).
    a_len, b_len = len(a_ids), len(b_ids)
    for _ in range(3):
        if a_len > b_len:
            a_len -= 1
        else:
            b_len -= 1
    encoded = encode_cloze(tokenizer, x, max_length=full - 3, multi_token=True)
    expected = [special.cls, *tokenizer.encode("A"), *a_ids[:a_len], *tokenizer.encode(" is"), special.mask,
                *b_ids[:b_len], *tokenizer.encode("."), special.eos]
    assert encoded.truncated and list(encoded.part_a) == expected and encoded.row_length == full - 3
    assert encoded.part_a[encoded.mask_index] == special.mask
    with pytest.raises(ValueError, match="does not fit max_length"):
        encode_cloze(tokenizer, x, max_length=len(fixed) + 2 + answer - 1, multi_token=True)


def test_single_token_task_rejects_multi_token_verbalizers(tokenizer):
    x = ClozeExample(parts_a=(Text("It was"), BLANK), candidates=(" great", " repeated execution"), choices=(0, 1),
                     source="data.jsonl:7")
    with pytest.raises(ValueError, match=r"data.jsonl:7: the verbalizer ' repeated execution' is 2 tokens"):
        encode_cloze(tokenizer, x, max_length=64, multi_token=False)


def test_cloze_loss_is_cross_entropy_over_the_candidate_scores(tokenizer):
    model = random_model(tokenizer)
    examples = [example(parts, candidates, target=len(candidates) - 1) for parts, candidates in EXAMPLES[2:]]
    encoded = [encode_cloze(tokenizer, x, max_length=128) for x in examples]
    batch = build_cloze_batch(encoded, tokenizer.special_ids)
    scores = cloze_forward(model, batch, length_penalty=1.0).scores
    loss = cloze_loss(scores, batch.targets)
    expected = 0.0
    for (parts, candidates), x in zip(EXAMPLES[2:], examples):
        candidate_scores = torch.tensor(oracle_scores(model, tokenizer, parts, candidates, True, 1.0))
        expected += -torch.log_softmax(candidate_scores, 0)[x.target].item()
    assert loss.item() == pytest.approx(expected / len(examples), rel=1e-6)
    loss.backward()  # finetuning trains through the same batch
    assert model.word_embeddings.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="target candidate"):
        cloze_loss(scores, torch.full_like(batch.targets, -1))


def test_example_needs_exactly_one_blank():
    with pytest.raises(ValueError, match="exactly one blank"):
        ClozeExample(parts_a=(Text("no blank"),), candidates=(" a",), choices=(0,), source="f:1")
    with pytest.raises(ValueError, match="f:2: a cloze pattern needs exactly one blank"):
        ClozeExample(parts_a=(BLANK, BLANK), candidates=(" a",), choices=(0,), source="f:2")


# ---------------------------------------------------------------------------------------------
# SuperGLUE patterns: the text each default pattern builds, written out by hand from the authors'


def filled(x: ClozeExample) -> str:
    return "".join("[MASK]" if p is BLANK else p.text for p in (*x.parts_a, *x.parts_b))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read(task, tmp_path, record):
    return task.read(write_jsonl(tmp_path / "data.jsonl", [record]))


def test_superglue_default_patterns(tmp_path):
    boolq = read(superglue_task("boolq"), tmp_path, {"passage": "Water boils at 100 C.", "question": "does water boil",
                                                     "label": True, "idx": 0})[0]
    assert filled(boolq) == "Based on the following passage does water boil?[MASK]. Water boils at 100 C."
    assert boolq.candidates == (" No", " Yes") and boolq.label == "true" and boolq.target == 1

    cb = read(superglue_task("cb"), tmp_path, {"premise": "It rained.", "hypothesis": "It was wet.",
                                               "label": "neutral"})[0]
    assert filled(cb) == "It was wet?[MASK]. It rained." and cb.candidates == (" Yes", " No", " Maybe")
    assert cb.target == 2

    rte = read(superglue_task("rte"), tmp_path, {"premise": "It rained.", "hypothesis": "It was \u201cwet\u201d.",
                                                 "label": "not_entailment"})[0]
    # The final punctuation goes, the closing quote with it (string.punctuation holds '"').
    assert filled(rte) == '"It was "wet" ?[MASK], "It rained."' and rte.candidates == (" Yes", " No")

    wic = read(superglue_task("wic"), tmp_path, {"sentence1": "A bank loan.", "sentence2": "A river bank.",
                                                 "word": "bank", "label": False})[0]
    assert filled(wic) == "A bank loan. A river bank. Does bank have the same meaning in both sentences?[MASK]"
    assert wic.label == "false"

    copa = read(superglue_task("copa"), tmp_path, {"premise": "The man fell.", "choice1": "He slipped.",
                                                   "choice2": "He Laughed!", "question": "cause", "label": 1})[0]
    assert filled(copa) == '"he slipped" or "he Laughed"? The man fell because[MASK].'
    assert copa.candidates == (" he slipped", " he Laughed") and copa.target == 1

    wsc = read(superglue_task("wsc"), tmp_path, {"text": "Mark told Pete he was late.", "label": True, "target": {
        "span1_text": "Pete", "span1_index": 2, "span2_text": "he", "span2_index": 3}})[0]
    assert filled(wsc) == ("Mark told Pete *he* was late. Question: In the passage above, what does the pronoun "
                           "'*he*' refer to? Answer:[MASK].")
    assert wsc.candidates == (" Pete",) and wsc.meta["generative"]

    multirc = read(superglue_task("multirc"), tmp_path, {"idx": 3, "passage": {"text": "Sam ran home.", "questions": [
        {"idx": 0, "question": "Who ran?", "answers": [{"text": "Sam", "label": 1}, {"text": "Al", "label": 0}]}]}})
    assert [filled(x) for x in multirc] == ["Sam ran home. Question: Who ran? Is it Sam?[MASK].",
                                            "Sam ran home. Question: Who ran? Is it Al?[MASK]."]
    assert [x.label for x in multirc] == [1, 0] and multirc[0].meta["question"] == (3, 0)

    passage = "Sam met Al in Paris.\n@highlight\nParis is nice"
    record = read(superglue_task("record"), tmp_path, {"idx": 0, "passage": {"text": passage, "entities": [
        {"start": 0, "end": 2}, {"start": 8, "end": 9}, {"start": 14, "end": 18}, {"start": 32, "end": 36}]},
        "qas": [{"idx": 5, "query": "@placeholder is nice", "answers": [{"text": "Paris"}]}]})[0]
    assert filled(record) == "Sam met Al in Paris.\n- Paris is nice [MASK] is nice"
    assert record.choices == ("Al", "Paris", "Sam") and record.candidates == (" Al", " Paris", " Sam")
    assert record.label == ["Paris"] and record.target == 1


def test_every_pattern_of_every_task_builds(tmp_path):
    records = {
        "boolq": {"passage": "p.", "question": "q", "label": False},
        "cb": {"premise": "p.", "hypothesis": "h.", "label": "contradiction"},
        "rte": {"premise": "p.", "hypothesis": "h.", "label": "entailment"},
        "wic": {"sentence1": "a.", "sentence2": "b.", "word": "w", "label": True},
        "copa": {"premise": "p.", "choice1": "A.", "choice2": "B.", "question": "effect", "label": 0},
        "wsc": {"text": "a b it", "label": False, "target": {"span1_text": "a", "span2_text": "it", "span2_index": 2},
                "candidates": [{"text": "b"}, "c", "b"]},
        "multirc": {"passage": {"text": "p.", "questions": [{"question": "q", "answers": [{"text": "a", "label": 1}]}]}},
        "record": {"passage": {"text": "Al", "entities": [{"start": 0, "end": 1}]},
                   "qas": [{"query": "@placeholder.", "answers": [{"text": "Al"}]}]},
    }
    for name, factory in SUPERGLUE_TASKS.items():
        pattern = 0
        while True:
            try:
                task = factory(pattern)
            except ValueError as exc:
                assert f"{name} has patterns 0..{pattern - 1}" in str(exc)
                break
            examples = read(task, tmp_path, records[name])
            assert examples and all(x.label is not None for x in examples)
            pattern += 1
        assert pattern >= 1
    wsc = read(superglue_task("wsc", 0), tmp_path, records["wsc"])[0]
    assert wsc.candidates == (" a", " b", " c") and not wsc.meta["generative"]


def test_wsc_decisions():
    task = superglue_task("wsc")
    generative = ClozeExample(parts_a=(BLANK,), candidates=(" a",), choices=(0,), meta={"generative": True})
    assert task.decide(generative, ClozeResult((-9.0,), (True,))) == "True"
    assert task.decide(generative, ClozeResult((-1.0,), (False,))) == "False"
    choice = ClozeExample(parts_a=(BLANK,), candidates=(" a", " b"), choices=(0, 1), meta={"generative": False})
    assert task.decide(choice, ClozeResult((-1.0, -2.0), (False, False))) == "True"
    assert task.decide(choice, ClozeResult((-3.0, -2.0), (False, False))) == "False"


# ---------------------------------------------------------------------------------------------
# Custom tasks


def test_custom_pattern_string(tmp_path):
    task = custom_task("{text} It was [MASK]. ({meta.source})", {"positive": "great", "negative": " terrible"})
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "Fine food", "label": "positive", "meta": {"source": "web"}},
                                              {"text": "Cold soup", "meta": {"source": 3}}])
    first, second = task.read(path)
    assert first.parts_a == (Text("Fine food", True), Text(" It was"), BLANK, Text(". ("), Text("web", True),
                             Text(")"))
    assert first.candidates == (" great", " terrible")  # the space before [MASK] went to the verbalizers
    assert first.label == "positive" and first.target == 0 and second.label is None
    no_space = custom_task("{text} ([MASK])", {"1": "a", "0": "b"}).read(write_jsonl(tmp_path / "e.jsonl", [
        {"text": "x", "label": 1}]))[0]
    assert no_space.candidates == ("a", "b") and no_space.label == "1"


def test_custom_pattern_function(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"review": "Fine food", "label": True}])
    text_task = custom_task(lambda r: f"{r['review']}. It was [MASK].", {"true": "great", "false": "terrible"})
    assert text_task.read(path)[0].parts_a == (Text("Fine food. It was"), BLANK, Text("."))
    parts_task = custom_task(lambda r: [Text(r["review"], True), Text(". Verdict:"), BLANK],
                             {"true": " good", "false": " bad"})
    x = parts_task.read(path)[0]
    assert x.parts_a[0].shortenable and x.label == "true" and x.candidates == (" good", " bad")
    bad = custom_task(lambda r: "no blank", {"true": "a"})
    with pytest.raises(ValueError, match=r"d.jsonl:1: the pattern function's text must hold \[MASK\] exactly once"):
        bad.read(path)


def test_custom_task_errors(tmp_path):
    with pytest.raises(ValueError, match=r"must hold \[MASK\] exactly once, found it 0 times"):
        custom_task("{text}", {"a": "b"})
    with pytest.raises(ValueError, match=r"found it 2 times"):
        custom_task("[MASK] {text} [MASK]", {"a": "b"})
    with pytest.raises(ValueError, match="LABEL=TEXT"):
        parse_verbalizer(["positive"])
    assert parse_verbalizer(["a=x=y", "b="]) == {"a": "x=y", "b": ""}
    task = custom_task("{text} [MASK]", {"positive": "great"})
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok", "label": "positive"}, {"label": "positive"}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: field 'text' is missing"):
        task.read(path)
    write_jsonl(path, [{"text": "ok", "label": "neutral"}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'label' is 'neutral', which the verbalizer lacks"):
        task.read(path)
    with pytest.raises(ValueError, match="custom task needs a pattern"):
        cloze_task("custom", verbalizer={"a": "b"})


# ---------------------------------------------------------------------------------------------
# Bad files


def test_bad_files_get_errors_naming_file_line_and_field(tmp_path):
    task = superglue_task("boolq")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        task.read(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty.jsonl' holds no records"):
        task.read(empty)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"passage": "p", "question": "q", "label": true}\n{"passage": "p", "label": true}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'question' is missing"):
        task.read(path)
    path.write_text('{"passage": "p", "question": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'question' must be a string, got 3"):
        task.read(path)
    path.write_text('{"passage": "p", "question": "q"}\n{"passage": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        task.read(path)
    path.write_text('[{"passage": "p"}]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected JSON lines"):
        read_jsonl(path)
    write_jsonl(path, [{"premise": "p", "hypothesis": "h", "label": "maybe"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'label' must be one of \['entailment'"):
        superglue_task("cb").read(path)
    write_jsonl(path, [{"passage": {"text": "p", "questions": [{"question": "q", "answers": [{"label": 1}]}]}}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'question.answers.0.text' is missing"):
        superglue_task("multirc").read(path)
    write_jsonl(path, [{"text": "a b c", "target": {"span1_text": "a", "span2_text": "it", "span2_index": 1}}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'target.span2_index' \(1\) does not point"):
        superglue_task("wsc").read(path)
    write_jsonl(path, [{"passage": {"text": "A", "entities": []}, "qas": [{"query": "no placeholder"}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'qas.0.query' holds no @placeholder"):
        superglue_task("record").read(path)
    with pytest.raises(ValueError, match="unknown task 'sst2'"):
        cloze_task("sst2")
    with pytest.raises(ValueError, match="boolq has patterns 0..5"):
        cloze_task("boolq", pattern_id=6)


# ---------------------------------------------------------------------------------------------
# Evaluation end to end with known scores


def test_evaluate_cloze_metrics_follow_the_scores(tmp_path, tokenizer):
    model = random_model(tokenizer)
    records = [{"premise": f"It rained {i}.", "hypothesis": "It was wet.",
                "label": ["entailment", "contradiction", "neutral"][i % 3]} for i in range(7)]
    records.append({"premise": "No label.", "hypothesis": "None."})
    task = superglue_task("cb")
    examples = task.read(write_jsonl(tmp_path / "cb.jsonl", records))
    evaluation = evaluate_cloze(model, tokenizer, task, examples)
    scores = [oracle_scores(model, tokenizer, [*x.parts_a, *x.parts_b], x.candidates, False) for x in examples]
    predictions = [x.choices[max(range(3), key=s.__getitem__)] for x, s in zip(examples, scores)]
    assert list(evaluation.predictions) == predictions
    gold = [r["label"] for r in records[:7]]
    accuracy = 100 * sum(p == g for p, g in zip(predictions, gold)) / 7
    assert evaluation.num_examples == 8 and evaluation.num_labelled == 7
    assert evaluation.metrics["accuracy"] == pytest.approx(accuracy)
    assert not math.isnan(evaluation.metrics["f1_macro"]) and evaluation.num_truncated == 0
    lengths = [encode_cloze(tokenizer, x, max_length=128).row_length for x in examples]
    short = evaluate_cloze(model, tokenizer, task, examples, max_length=min(lengths))
    assert short.num_truncated == sum(length > min(lengths) for length in lengths) > 0


# ---------------------------------------------------------------------------------------------
# Metrics (percentages), by hand and against scikit-learn where it is installed


def test_metrics_by_hand():
    from glm_ext.tasks.metrics import (accuracy, f1, macro_f1, multirc_exact_match, normalize_answer,
                                       squad_exact_match, squad_f1)

    gold = ["a", "b", "c", "a", "b"]
    predicted = ["a", "b", "b", "c", "b"]
    assert accuracy(predicted, gold) == pytest.approx(60.0)
    # a: P 1/1 R 1/2 -> 2/3; b: P 2/3 R 2/2 -> 4/5; c: P 0 -> 0
    assert macro_f1(predicted, gold) == pytest.approx(100 * (2 / 3 + 4 / 5 + 0) / 3)
    # positive 1: TP 1, predicted 2, actual 3 -> P 1/2, R 1/3 -> F1 0.4
    assert f1([1, 1, 0, 0], [1, 0, 1, 1]) == pytest.approx(40.0)
    assert f1([0, 0], [0, 0]) == 0.0
    # question q1: both right; q2: one wrong -> EM 50
    assert multirc_exact_match([1, 0, 1, 1], [1, 0, 1, 0], ["q1", "q1", "q2", "q2"]) == pytest.approx(50.0)
    assert normalize_answer("The  Café, in Paris!") == "cafe in paris"
    assert squad_exact_match(["the Paris", "Rome"], [["Paris", "Lyon"], ["Milan"]]) == pytest.approx(50.0)
    # "big red car" vs "red car": P 2/3 R 1 -> 0.8; vs "a blue car": P 1/3 R 1/2 -> 0.4 (best: 0.8)
    assert squad_f1(["big red car"], [["red car", "a blue car"]]) == pytest.approx(80.0)
    with pytest.raises(ValueError, match="at least one labelled"):
        accuracy([], [])


def test_metrics_agree_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    from glm_ext.tasks.metrics import f1, macro_f1

    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        gold = torch.randint(0, 3, (30,), generator=generator).tolist()
        predicted = torch.randint(0, 3, (30,), generator=generator).tolist()
        assert macro_f1(predicted, gold) == pytest.approx(100 * metrics.f1_score(gold, predicted, average="macro"))
        binary_gold, binary_predicted = [g % 2 for g in gold], [p % 2 for p in predicted]
        assert f1(binary_predicted, binary_gold) == pytest.approx(100 * metrics.f1_score(binary_gold, binary_predicted))
