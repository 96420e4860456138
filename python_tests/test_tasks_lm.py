"""glm_ext.tasks.language_model: the layouts, perplexity against a token-by-token computation,
LAMBADA-style accuracy on texts with known answers; and the seq2seq layouts and loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from glm_ext.tasks.language_model import (
    document_log_likelihoods,
    document_windows,
    lambada,
    lm_span,
    perplexity,
    read_texts,
    split_last_word,
)
from glm_ext.tasks.seq2seq import (
    collate_seq2seq,
    extraction_source,
    inference_row,
    question_generation_source,
    seq2seq_loss,
    summarization_source,
    training_row,
)
from tasks_testing import TableModel, blank_input, direct_log_probs, one_thread, random_model, small_tokenizer  # noqa: F401

TEXT = ('The "while" statement is used for repeated execution as long as an expression is true. '
        'The "if" statement is used for conditional execution.')


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


class Special:
    pad, eos, cls, mask, gmask, smask, sop, eop = 0, 1, 2, 4, 6, 5, 7, 8


def test_lm_span_layouts():
    span = lm_span([11, 12, 13], [21, 22], Special, mode="bidirectional", mask_id=4, add_eos=True)
    assert span.row.ids == (2, 11, 12, 13, 4, 1, 7, 21)
    assert span.row.positions == (0, 1, 2, 3, 4, 5, 4, 4) and span.row.blocks == (0,) * 6 + (1, 2)
    assert span.row.sep == 6 and span.start == 6 and span.tokens == (21, 22)
    span = lm_span([11, 12, 13], [21, 22], Special, mode="unidirectional", mask_id=6, add_eos=False)
    assert span.row.ids == (2, 11, 6, 7, 12, 13, 21)
    assert span.row.positions == (0, 1, 2, 2, 2, 2, 2) and span.row.blocks == (0, 0, 0, 1, 2, 3, 4)
    assert span.row.sep == 3 and span.start == 5 and span.tokens == (21, 22)
    with pytest.raises(ValueError, match="mode must be one of"):
        lm_span([1], [2], Special, mode="causal", mask_id=4, add_eos=False)


def test_document_windows_score_every_token_once():
    assert document_windows(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    assert document_windows(10, 4, 4, score_first_token=True) == [(0, 0, 4), (4, 4, 8), (8, 8, 10)]
    assert document_windows(3, 8, 4) == [(0, 1, 3)] and document_windows(1, 8, 4) == []
    for n in range(0, 40, 3):
        for window, stride in ((5, 1), (7, 3), (6, 6)):
            scored = [t for _, first, end in document_windows(n, window, stride) for t in range(first, end)]
            assert scored == list(range(1, n))
            assert all(end - start <= window for start, _, end in document_windows(n, window, stride))
    with pytest.raises(ValueError, match="stride"):
        document_windows(10, 4, 5)


def oracle_log_likelihood(model, tokenizer, tokens, *, mode, window, stride, score_first_token):
    """Every scored token on its own: find the window that scores it (the first whose end lies
    beyond it), build that window's input up to the token, read its log-probability."""
    special = tokenizer.special_ids
    mask = special.mask
    total, count = 0.0, 0
    first = 0 if score_first_token else 1
    for t in range(first, len(tokens)):
        k = max(0, -(-(t - window + 1) // stride))  # the first window k with k * stride + window > t
        start = k * stride
        first_scored = first if k == 0 else (k - 1) * stride + window
        context = tokens[start:first_scored]
        if mode == "bidirectional":
            part_a = [special.cls, *context, mask]
            part_b = [special.sop, *tokens[first_scored:t]]
        else:
            part_a = [special.cls, *context[:1], mask]
            part_b = [special.sop, *context[1:], *tokens[first_scored:t]]
        log_probs = direct_log_probs(model, *blank_input(part_a, part_b, len(part_a) - 1))
        total += log_probs[-1, tokens[t]].item()
        count += 1
    return total, count


@pytest.mark.parametrize("mode", ["bidirectional", "unidirectional"])
@pytest.mark.parametrize("score_first_token", [False, True])
def test_perplexity_equals_a_token_by_token_computation(tokenizer, mode, score_first_token):
    model = random_model(tokenizer)
    tokens = tokenizer.encode(TEXT)
    other = tokenizer.encode("The loop without executing the else clause.")
    assert len(tokens) > 25
    options = dict(mode=mode, window=10, stride=4, score_first_token=score_first_token)
    per_document = document_log_likelihoods(model, tokenizer, [tokens, other], max_tokens=30, **options)
    expected = [oracle_log_likelihood(model, tokenizer, doc, **options) for doc in (tokens, other)]
    for (ll, n), (expected_ll, expected_n) in zip(per_document, expected):
        assert n == expected_n and ll == pytest.approx(expected_ll, rel=1e-9)
    result = perplexity(model, tokenizer, [tokens, other], **options)
    total = sum(ll for ll, _ in expected)
    count = sum(n for _, n in expected)
    assert result.num_tokens == count
    assert result.perplexity == pytest.approx(math.exp(-total / count), rel=1e-9)


def test_perplexity_default_window_fills_the_model(tokenizer):
    model = random_model(tokenizer, max_sequence_length=24)
    tokens = tokenizer.encode(TEXT)
    result = perplexity(model, tokenizer, [tokens])  # rows of 22 + [CLS] + mask tokens: within positions
    assert result.num_tokens == len(tokens) - 1 and result.num_windows == len(document_windows(len(tokens), 22, 11))


def lambada_table(tokenizer, right, wrong_first, wrong_second):
    """A next-token table under which the texts of ``right`` end as written, those of
    ``wrong_first`` get the first token of their last word wrong, ``wrong_second`` a later one."""
    table = {}

    def put(key, value):
        assert table.get(key, value) == value, "the texts must not share table entries"
        table[key] = value

    for group, texts in (("right", right), ("first", wrong_first), ("second", wrong_second)):
        for text in texts:
            context, word = text.rsplit(" ", 1)
            context_ids, word_ids = tokenizer.encode(context), tokenizer.encode(" " + word)
            if group == "second":
                assert len(word_ids) >= 2
            put(context_ids[-1], word_ids[0] if group != "first" else word_ids[0] + 1)
            for i, (a, b) in enumerate(zip(word_ids, word_ids[1:])):
                put(a, b + 1 if group == "second" and i == 0 else b)
    return table


@pytest.mark.parametrize("mode", ["bidirectional", "unidirectional"])
def test_lambada_accuracy_on_texts_with_known_answers(tokenizer, mode):
    right = ["It was great", "Use the loop without executing the else clause", "A string tuple or list"]
    wrong_first = ["The first suite terminates"]
    wrong_second = ["Is the passage zqxvw"]  # a word of several tokens
    table = lambada_table(tokenizer, right, wrong_first, wrong_second)
    config = random_model(tokenizer, max_sequence_length=10).config
    model = TableModel(config, tokenizer.special_ids.sop, table, fallback=tokenizer.special_ids.unk)
    texts = [right[0], wrong_first[0], right[1], wrong_second[0], right[2]]
    assert len(tokenizer.encode(right[1].rsplit(" ", 1)[0])) + 3 + 1 > 10  # over max_length below
    result = lambada(model, tokenizer, texts, mode=mode, max_length=10, max_tokens=24)
    assert result.correct == (True, False, True, False, True)  # the long text lost its first tokens
    assert result.accuracy == pytest.approx(60.0)
    assert model.calls > 1  # batched within max_tokens


def test_split_last_word():
    assert split_last_word("He said hello  world ") == ("He said hello", " world")
    assert split_last_word("word") == ("", " word")
    with pytest.raises(ValueError, match="empty"):
        split_last_word("  ")


def test_read_texts_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"txt": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: field 'text' is missing"):
        read_texts(path)
    path.write_text(json.dumps({"text": " "}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'text' is empty"):
        read_texts(path)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match=r"e.txt' holds no text"):
        read_texts(tmp_path / "e.txt")
    (tmp_path / "f.txt").write_text("one\ntwo\n")
    assert read_texts(tmp_path / "f.txt") == ["one\ntwo\n"]


# ---------------------------------------------------------------------------------------------
# seq2seq layouts (GLM_SPEC 6.1) and loss


def test_summarization_layout(tokenizer):
    special = tokenizer.special_ids
    source = summarization_source(tokenizer, "The loop terminates.", source_length=16)
    content = tokenizer.encode(" Content:")
    article = tokenizer.encode(" The loop terminates.")
    assert source == [special.cls, special.mask, *content, *article] + [special.pad] * (16 - 2 - len(content) -
                                                                                        len(article))
    cut = summarization_source(tokenizer, TEXT, source_length=12, mask_token="[sMASK]")
    assert len(cut) == 12 and cut[1] == special.smask and cut[2 + len(content):] == tokenizer.encode(" " + TEXT)[:10 - len(content)]

    target = tokenizer.encode(" It was great.")
    row = training_row(source, target, special, target_length=len(target) + 3)
    n = 16
    assert row.row.sep == n and row.row.ids[:n] == tuple(source)
    assert row.row.ids[n:] == (special.sop, *target, special.eop, special.pad)
    assert row.row.positions[n:] == (1,) * (len(target) + 3)
    assert row.row.blocks[n:] == tuple(range(1, len(target) + 4))
    assert row.targets[n:] == (*target, special.eop, special.pad, special.pad)
    assert row.loss_mask == (0,) * n + (1,) * (len(target) + 1) + (0, 0)
    short = training_row(source, target, special, target_length=2)
    assert short.targets[n:] == tuple(target[:2]) and short.loss_mask[n:] == (1, 1)
    start = inference_row(source, special)
    assert start.ids == (*source, special.sop) and start.positions[-1] == 1 and start.blocks[-1] == 1


def test_question_generation_layout_centres_long_contexts_on_the_answer(tokenizer):
    special = tokenizer.special_ids
    source = question_generation_source(tokenizer, "The loop terminates.", "loop", source_length=24)
    body = tokenizer.encode("The loop terminates. Question:")
    answer = tokenizer.encode(" Answer: loop")
    assert source[: 2 + len(body) + len(answer)] == [special.cls, *body, special.mask, *answer]
    long_context = TEXT + " " + TEXT + " The zqxvw is here."
    cut = question_generation_source(tokenizer, long_context, "zqxvw", source_length=20)
    assert len(cut) == 20 and tokenizer.encode(" zqxvw")[0] in cut


def test_extraction_layout(tokenizer):
    special = tokenizer.special_ids
    source = extraction_source(tokenizer, "Which loop?", "The while statement is used for repeated execution.",
                               source_length=14)
    question = tokenizer.encode(" Which loop?")
    context = tokenizer.encode(" The while statement is used for repeated execution.")
    room = 14 - len(question) - 3
    assert source == [special.cls, *question, special.mask, *tokenizer.encode("."), *context[:room]]
    with pytest.raises(ValueError, match="no room"):
        extraction_source(tokenizer, TEXT, "x", source_length=8)


def test_seq2seq_loss_covers_part_b_only_and_smooths_labels(tokenizer):
    special = tokenizer.special_ids
    model = random_model(tokenizer)
    source = summarization_source(tokenizer, "The loop terminates.", source_length=12)
    rows = [training_row(source, tokenizer.encode(t), special, target_length=6) for t in (" It was great.", " No")]
    batch = collate_seq2seq(rows)
    logits = model(batch.input_ids, batch.position_ids, batch.sep)
    log_probs = torch.log_softmax(logits.double(), -1)
    for smoothing in (0.0, 0.1):
        loss = seq2seq_loss(logits, batch.targets, batch.loss_mask, smoothing)
        terms = []
        for b in range(2):
            for i in range(logits.shape[1]):
                if batch.loss_mask[b, i]:
                    nll = -log_probs[b, i, batch.targets[b, i]].item()
                    terms.append((1 - smoothing) * nll - smoothing * log_probs[b, i].mean().item())
        assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    # Part A logits do not count: changing them leaves the loss as it is.
    changed = logits.clone()
    changed[:, : batch.sep[0]] += torch.randn_like(changed[:, : batch.sep[0]])
    assert seq2seq_loss(changed, batch.targets, batch.loss_mask, 0.1).item() == pytest.approx(
        seq2seq_loss(logits, batch.targets, batch.loss_mask, 0.1).item(), rel=1e-12)
    with pytest.raises(ValueError, match="label_smoothing"):
        seq2seq_loss(logits, batch.targets, batch.loss_mask, 1.0)
