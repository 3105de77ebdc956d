"""The shipped next-line task: deterministic, built from the evaluation text only, answered above chance."""

import json

import numpy as np
import pytest
import torch

from finetune import next_line
from finetune.data import TaskFormat, encode_tasks, read_task_jsonl
from finetune.evaluate import task_scores
from pruning import adapter, reference


def test_the_shipped_file_is_what_the_builder_makes(tmp_path):
    assert next_line.main([str(tmp_path / "again.jsonl")]) == 0
    assert (tmp_path / "again.jsonl").read_bytes() == next_line.TASK_PATH.read_bytes()


def test_rows_come_from_the_evaluation_text_only():
    rows = [json.loads(x) for x in next_line.TASK_PATH.read_text().splitlines()]
    assert len(rows) == next_line.N_EXAMPLES
    evaluation = reference.EVALUATION_TEXT.read_text()
    lines = [x.rstrip() for x in evaluation.splitlines()]
    for row in rows:
        answer = row["options"][row["answer"]]
        assert len(row["options"]) == 4 and len(set(row["options"])) == 4
        assert all(o in lines and lines.count(o) == 1 for o in row["options"])
        i = lines.index(answer)
        assert row["context"] == next_line.context_before(lines, i)  # the true line follows its context
        assert row["context"] in evaluation
        assert all(abs(lines.index(o) - i) >= next_line.FAR for o in row["options"] if o != answer)
    # answers lie more than CONTEXT_LINES apart: tuning on some examples never shows another's answer as context
    at = sorted(lines.index(row["options"][row["answer"]]) for row in rows)
    assert min(np.diff(at)) > next_line.CONTEXT_LINES
    # the right option's place is uniform over the four: each count is binomial(800, 1/4), mean 200 and standard
    # deviation 12.2, so 4 of them (151..249) hold for a fair shuffle and fail for any fixed or skewed place
    counts = np.bincount([row["answer"] for row in rows], minlength=next_line.N_OPTIONS)
    assert len(counts) == next_line.N_OPTIONS and counts.sum() == len(rows)
    assert all(151 <= c <= 249 for c in counts), counts
    # nor does it follow a pattern (a cycle, a run): neighbours share the place with chance 1/4, standard deviation
    # 0.015 over 799 pairs, so within 4 of them
    same = np.diff([row["answer"] for row in rows]) == 0
    assert 0.19 <= same.mean() <= 0.31, same.mean()


@pytest.mark.slow  # 800 examples x 4 options through the reference model (about 80 s on one CPU thread)
def test_the_reference_model_answers_well_above_chance():
    tokenizer = adapter.load_tokenizer(str(reference.MODEL_DIR))
    model = adapter.load_model(str(reference.MODEL_DIR), torch.device("cpu"), torch.float32)
    fmt = TaskFormat(next_line.TEMPLATE, answer_prefix=next_line.ANSWER_PREFIX)
    tasks = encode_tasks(tokenizer, read_task_jsonl(next_line.TASK_PATH, fmt), max_len=512)
    scores = task_scores(model, tasks, batch_size=16)
    # chance is 0.25; 800 examples put its standard error at 0.015, so 0.30 is more than 3 of them above
    assert scores.acc == pytest.approx(0.3425, abs=1e-9)
    assert scores.acc >= 0.30
