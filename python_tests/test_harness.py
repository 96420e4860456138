"""glm_ext.harness: the lm-eval model's answers equal glm_ext's own scores, and lm-eval runs it
offline end to end on tasks defined over a local JSON-lines file."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

import glm_ext.harness  # noqa: E402

from glm_ext.checkpoint import save_checkpoint  # noqa: E402
from glm_ext.harness import GLMExtLM, lm_eval_argv  # noqa: E402
from glm_ext.tasks.language_model import document_log_likelihoods, lambada  # noqa: E402
from tasks_testing import blank_input, direct_log_probs, one_thread, random_model, small_tokenizer  # noqa: E402,F401

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def request(kind, *arguments):
    return Instance(request_type=kind, doc={}, arguments=tuple(arguments), idx=0)


TEXTS = ["The while statement is used for repeated execution", "It was great", "A string tuple or list",
         "The first suite terminates the loop without executing the else clause"]


@pytest.mark.parametrize("mode", ["bidirectional", "unidirectional"])
def test_loglikelihood_equals_glm_ext_scores(tokenizer, mode):
    model = random_model(tokenizer)
    lm = GLMExtLM(model=model, tokenizer=tokenizer, mode=mode, max_tokens=64)
    contexts = [t.rsplit(" ", 1)[0] for t in TEXTS]
    words = [" " + t.rsplit(" ", 1)[1] for t in TEXTS]
    # The context's trailing space moves to the continuation: both spellings score the same.
    answers = lm.loglikelihood([request("loglikelihood", c + " ", w[1:]) for c, w in zip(contexts, words)])
    own = lambada(model, tokenizer, TEXTS, mode=mode)
    for (log_prob, greedy), expected, right in zip(answers, own.log_probs, own.correct):
        assert log_prob == pytest.approx(expected, rel=1e-12) and greedy == right
    # And directly: the continuation in a blank after the context (bidirectional layout).
    if mode == "bidirectional":
        special = tokenizer.special_ids
        part_a = [special.cls, *tokenizer.encode(contexts[1]), special.mask, special.eos]
        word = tokenizer.encode(words[1])
        log_probs = direct_log_probs(model, *blank_input(part_a, [special.sop, *word[:-1]], len(part_a) - 2))
        direct = sum(log_probs[len(part_a) + i, t].item() for i, t in enumerate(word))
        assert answers[1][0] == pytest.approx(direct, rel=1e-9)


def test_loglikelihood_rolling_scores_every_token(tokenizer):
    model = random_model(tokenizer, max_sequence_length=16)
    lm = GLMExtLM(model=model, tokenizer=tokenizer)
    answers = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in TEXTS])
    documents = [tokenizer.encode(t) for t in TEXTS]
    own = document_log_likelihoods(model, tokenizer, documents, score_first_token=True)
    assert answers == pytest.approx([ll for ll, _ in own], rel=1e-12)
    assert [n for _, n in own] == [len(d) for d in documents]  # every token, the first included
    # A short text fits one window: its log-likelihood is that of the text after [CLS] [MASK].
    special = tokenizer.special_ids
    tokens = documents[1]
    log_probs = direct_log_probs(model, *blank_input([special.cls, special.mask], [special.sop, *tokens[:-1]], 1))
    assert answers[1] == pytest.approx(sum(log_probs[2 + i, t].item() for i, t in enumerate(tokens)), rel=1e-9)


def test_generate_until_stops_at_the_until_strings(tokenizer):
    model = random_model(tokenizer)
    lm = GLMExtLM(model=model, tokenizer=tokenizer)
    (full,) = lm.generate_until([request("generate_until", "The while statement", {"max_gen_toks": 6})])
    assert full
    stop = full[len(full) // 2:]
    (cut,) = lm.generate_until([request("generate_until", "The while statement",
                                        {"max_gen_toks": 6, "until": [stop, "never"]})])
    assert cut == full[: full.index(stop)]


def test_constructor_errors(tokenizer):
    with pytest.raises(ValueError, match="model_args path="):
        GLMExtLM()
    with pytest.raises(ValueError, match="mode must be one of"):
        GLMExtLM(model=random_model(tokenizer), tokenizer=tokenizer, mode="causal")
    with pytest.raises(FileNotFoundError, match="neither a training run"):
        GLMExtLM(path="/nonexistent/run")
    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", "glm_ext", "--tasks", "x"]
    assert lm_eval_argv(["--model", "hf"]) == ["run", "--model", "hf"]


def test_registration_survives_running_the_module_as_a_script():
    # ``python -m glm_ext.harness`` executes the file once more as ``__main__``: registering the
    # name again must not collide, and the name must still give the importable class.
    runpy.run_path(glm_ext.harness.__file__, run_name="glm_ext_harness_as_script")
    assert get_model("glm_ext") is GLMExtLM


# ``glm-ext evaluate harness`` in a process where any network connection raises.
NO_NETWORK = textwrap.dedent("""
    import socket, sys
    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted")
    socket.socket.connect = refuse
    socket.create_connection = refuse
    from glm_ext.cli import main
    sys.exit(main(["evaluate", "harness", *sys.argv[1:]]))
""")


def write_tasks(directory: Path, data: Path) -> None:
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (directory / "glm_ext_tiny_ll.yaml").write_text(
        "task: glm_ext_tiny_ll\n" + common + "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: " {{word}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: perplexity\n")
    (directory / "glm_ext_tiny_rolling.yaml").write_text(
        "task: glm_ext_tiny_rolling\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{context}} {{word}}"\n'
        "metric_list:\n  - metric: word_perplexity\n")
    (directory / "glm_ext_tiny_generate.yaml").write_text(
        "task: glm_ext_tiny_generate\n" + common + "output_type: generate_until\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: " {{word}}"\n'
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 3\n"
        "metric_list:\n  - metric: exact_match\n")


def test_glm_ext_evaluate_harness_runs_lm_eval_offline_on_local_tasks(tokenizer, tmp_path):
    model = random_model(tokenizer).float()
    save_checkpoint(model, tmp_path / "model")
    tokenizer.save(tmp_path / "tokenizer.json")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"context": t.rsplit(" ", 1)[0], "word": t.rsplit(" ", 1)[1]}) + "\n"
                            for t in TEXTS))
    write_tasks(tmp_path, data)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf-cache"), HF_HOME=str(tmp_path / "hf-home"),
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "results"
    command = [sys.executable, "-c", NO_NETWORK, str(tmp_path / "model"), "--tokenizer", str(tmp_path / "tokenizer.json"),
               "--tasks", "glm_ext_tiny_ll,glm_ext_tiny_rolling,glm_ext_tiny_generate",
               "--include_path", str(tmp_path), "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results_file = next(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]
    assert set(results) == {"glm_ext_tiny_ll", "glm_ext_tiny_rolling", "glm_ext_tiny_generate"}

    # The per-sample log-likelihoods lm-eval recorded are glm_ext's own.
    samples = [json.loads(line) for path in out.rglob("samples_glm_ext_tiny_ll_*.jsonl")
               for line in path.read_text().splitlines()]
    assert len(samples) == len(TEXTS)
    own = lambada(model, tokenizer, TEXTS)
    by_context = {t.rsplit(" ", 1)[0]: lp for t, lp in zip(TEXTS, own.log_probs)}
    for sample in samples:
        (log_prob, _), = sample["resps"][0]
        assert float(log_prob) == pytest.approx(by_context[sample["doc"]["context"]], rel=1e-4)
    assert torch.isfinite(torch.tensor(results["glm_ext_tiny_rolling"]["word_perplexity,none"]))
