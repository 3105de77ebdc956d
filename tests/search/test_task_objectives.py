"""Task and lm-eval objectives: lm-eval's acc / acc_norm rules by hand, offline lm-eval, and bad input refused."""

import json
import math
import sys

import numpy as np
import optuna
import pytest
import torch

from finetune.data import TaskFormat, encode_tasks
from search import run
from search.objectives import LMEval, TaskAccuracy
from search.objectives.harness import Suite
from search.trials import measurements
from tests.conftest import optional_package
from tests.finetune.conftest import char_model, char_tokenizer
from tests.search.test_run import args, load

# option lengths differ, so acc (summed log-likelihood) and acc_norm (per character) can disagree
ROWS = [
    {"question": "1+1=", "options": ["2", "22222", "3"], "answer": 0},
    {"question": "ab", "options": ["c", "cdefg"], "answer": 1},
    {"question": "x=", "options": ["yy", "y", "zzz"], "answer": 2},
    {"question": "Q:", "options": ["no", "yes"], "answer": 1},
]
FMT = TaskFormat("{question}", answer_prefix=" ")


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """sum_t log p(continuation_t | context, continuation_<t), by one forward pass of the joined ids."""
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    ids = torch.tensor([ctx + tokenizer(continuation, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(len(ctx), ids.shape[1]))


def by_hand(model, tokenizer, rows):
    acc, acc_norm, margin = [], [], []
    for r in rows:
        ll = np.array([loglikelihood(model, tokenizer, r["question"], " " + o) for o in r["options"]])
        chars = np.array([len(o) for o in r["options"]])
        acc.append(ll.argmax() == r["answer"])
        acc_norm.append((ll / chars).argmax() == r["answer"])
        margin.append(ll[r["answer"]] - np.delete(ll, r["answer"]).max())
    return np.mean(acc), np.mean(acc_norm), np.mean(margin)


@pytest.fixture(scope="module")
def char_lm():
    return char_model(seed=3), char_tokenizer()


def test_task_objective_scores_options_by_lm_eval_rules(char_lm):
    model, tokenizer = char_lm
    examples = tuple(FMT.example(r) for r in ROWS)
    score = TaskAccuracy(encode_tasks(tokenizer, examples, max_len=64), batch_size=3)(model)
    acc, acc_norm, margin = by_hand(model, tokenizer, ROWS)
    assert score.value == acc and score.metrics["acc_norm"] == acc_norm
    assert score.metrics["margin"] == pytest.approx(margin, abs=1e-4)
    assert TaskAccuracy.direction == "maximize"


def write_lm_eval_task(root, rows) -> str:
    data = root / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{options}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return str(root)


@pytest.mark.slow  # lm-eval indexes its own tasks first (seconds)
def test_lm_eval_objective_runs_offline_on_a_local_yaml_and_agrees_by_hand(char_lm, tmp_path):
    optional_package("lm_eval", "pip install '.[eval]'")
    model, tokenizer = char_lm
    include = write_lm_eval_task(tmp_path, ROWS * 2)  # 8 documents: 3 searched, 5 held out
    suite = Suite.load("lm-eval:tiny_mc", include)
    assert suite.sizes == {"tiny_mc": 8}
    search = LMEval.build(suite, model, tokenizer, batch_size=4, limit=3, split="search")
    held = LMEval.build(suite, model, tokenizer, batch_size=4, limit=3, split="held_out")
    assert search.samples == {"tiny_mc": [0, 1, 2]} and held.samples == {"tiny_mc": [3, 4, 5, 6, 7]}
    score = search(model)
    acc, acc_norm, _ = by_hand(model, tokenizer, ROWS[:3])
    assert search.name == "lm-eval:tiny_mc"
    assert score.value == pytest.approx(acc) and score.metrics == {"tiny_mc/acc": pytest.approx(acc),
                                                                   "tiny_mc/acc_norm": pytest.approx(acc_norm)}
    assert held(model).value == pytest.approx(by_hand(model, tokenizer, (ROWS * 2)[3:])[0])


def task_file(root, rows=None):
    """A small next-line task over the tiny model's evaluation text."""
    path = root / "task.jsonl"
    if rows is None:
        lines = [x for x in (root / "evaluation.txt").read_text().splitlines() if 12 < len(x.strip()) and len(x) < 30]
        rng = np.random.default_rng(0)
        rows = []
        for i in range(2, 42):
            options = [lines[i], *(lines[j] for j in rng.choice(len(lines), 3, replace=False))]
            rows.append({"context": lines[i - 1], "options": options, "answer": 0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TASK_ARGS = ["--task-template", "{context}", "--task-answer-prefix", "\n", "--task-search-examples", "8"]


@pytest.mark.parametrize("case", ["no task", "no options", "lm-eval task missing", "lm-eval not installed"])
def test_bad_objective_input_exits_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch, case):
    out = tmp_path / "run"
    extra = {
        "no task": ["--objective", "task"],
        "no options": ["--objective", "task", "--task", str(task_file(tmp_path, [{"context": "a", "answer": "b"}])),
                       *TASK_ARGS],
        "lm-eval task missing": ["--objective", "lm-eval:no_such_task", "--eval-include", str(tmp_path)],
        "lm-eval not installed": ["--objective", "lm-eval:tiny_mc"],
    }[case]
    if case == "lm-eval task missing":
        optional_package("lm_eval", "pip install '.[eval]'")
    if case == "lm-eval not installed":
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is absent
    assert run.main(args(tiny_model_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert {
        "no task": "--objective task needs --task FILE.jsonl",
        "no options": "example 1 has 0 options; the task objective scores options",
        "lm-eval task missing": "lm-eval task no_such_task not found",
        "lm-eval not installed": "pip install 'prunesearch[eval]'",
    }[case] in err
    assert not out.exists()


@pytest.fixture(scope="module")
def task_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "task"
    command = args(tiny_model_dir, out, "--budget", "75%", "--trials", "7", "--objective", "task",
                   "--task", str(task_file(tiny_model_dir)), *TASK_ARGS, "--predictor-target", "margin")
    assert run.main(command) == 0
    return out, command


@pytest.mark.slow
def test_a_task_search_maximises_accuracy_and_learns_the_margin(task_run):
    out, _ = task_run
    study = load(out)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    records = measurements(study)
    assert len(records) == 7 and all(m.objective == "task" for m in records)
    for m in records:
        assert 0 <= m.value <= 1 and m.value * 8 == round(m.value * 8)  # accuracy on 8 search examples
        assert m.loss == pytest.approx(math.exp(-m.metrics["margin"]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "task" and summary["objective_direction"] == "maximize"
    assert set(summary["objective_values"]) == {"base", "uniform", "threshold", "knapsack", "searched"}
    for row in summary["objective_values"].values():
        assert set(row) == {"perplexity", "task", "task/acc_norm", "task/margin"}
    assert summary["objective_values"]["searched"]["perplexity"] == summary["best_perplexity"]
    assert "Objective **task** (maximized)" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_resuming_with_another_objective_is_refused(task_run, capsys):
    out, command = task_run
    i = command.index("--objective")
    kl = [*command[:i], "--objective", "kl", *command[i + 2 :]]
    kl = kl[: kl.index("--predictor-target")]
    assert run.main(kl) == 2
    assert "different objective" in capsys.readouterr().err
    j = command.index("--task-search-examples")
    assert run.main([*command[:j], "--task-search-examples", "9", *command[j + 2 :]]) == 2
    assert "different objective_settings" in capsys.readouterr().err
