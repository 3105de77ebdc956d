"""Task rendering, deterministic few-shot sampling, answer-only labels, LM domains."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.data import (
    IGNORE,
    Domain,
    TaskDataError,
    TaskExample,
    TaskFormat,
    encode_tasks,
    lm_domain,
    read_task_jsonl,
    read_task_split,
    shot_indices,
    split_examples,
    task_domain,
    text_domain,
)
from tests.finetune.conftest import char_tokenizer

FMT = TaskFormat(template="Q: {q}\nA:")
ROWS = [
    {"q": "1+1", "options": ["2", "3"], "answer": 0},
    {"q": "2+2", "options": ["3", "4"], "answer": "4"},
    {"q": "3+3", "options": ["6", "7"], "answer": 0},
    {"q": "4+4", "options": ["9", "8"], "answer": 1},
]


def examples() -> tuple[TaskExample, ...]:
    return tuple(FMT.example(row) for row in ROWS)


def ids(text: str) -> list[int]:
    return char_tokenizer()(text, add_special_tokens=False)["input_ids"]


def test_jsonl_rows_render_with_answer_prefix_and_index_answers(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    got = read_task_jsonl(path, FMT)
    assert got[0] == TaskExample("Q: 1+1\nA:", " 2", (" 2", " 3"), prefix=" ")
    assert got[1].answer == " 4" and got[1].answer_index == 1
    assert got[3].answer == " 8" and got[3].answer_index == 1


def test_bad_rows_say_what_is_wrong(tmp_path):
    with pytest.raises(TaskDataError, match="row 3: field 'q' is missing"):
        FMT.example({"question": "x", "answer": "y"}, "row 3")
    with pytest.raises(TaskDataError, match="answer index 2 but 2 options"):
        FMT.example({"q": "x", "options": ["a", "b"], "answer": 2})
    with pytest.raises(TaskDataError, match="is not one of the options"):
        FMT.example({"q": "x", "options": ["a", "b"], "answer": "c"})
    path = tmp_path / "bad.jsonl"
    path.write_text('{"q": "1"}\nnot json\n')
    with pytest.raises(TaskDataError, match="bad.jsonl:1: field 'answer' is missing"):
        read_task_jsonl(path, FMT)


def test_few_shot_sampling_is_deterministic_and_excludes_the_example():
    first = [shot_indices(10, 4, seed=7, index=i, exclude_self=True) for i in range(10)]
    again = [shot_indices(10, 4, seed=7, index=i, exclude_self=True) for i in reversed(range(10))][::-1]
    assert first == again
    assert all(i not in shots and len(set(shots)) == 4 for i, shots in enumerate(first))
    assert first != [shot_indices(10, 4, seed=8, index=i, exclude_self=True) for i in range(10)]
    assert sorted(shot_indices(3, 50, seed=0, index=1, exclude_self=True)) == [0, 2]
    assert sorted(shot_indices(3, 50, seed=0, index=1, exclude_self=False)) == [0, 1, 2]


def test_labels_cover_exactly_the_answer_tokens():
    tok = char_tokenizer()
    encoded = encode_tasks(tok, examples(), max_len=64, shots=1, seed=3)
    domain = task_domain("arith", encoded, pad_id=tok.pad_token_id)
    for row, (ex, enc) in enumerate(zip(examples(), encoded, strict=True)):
        shot = examples()[shot_indices(4, 1, 3, row, exclude_self=True)[0]]
        context = ids(shot.prompt + shot.answer + "\n\n" + ex.prompt)
        answer = ids(ex.answer)
        n = len(context) + len(answer)
        assert list(enc.context) == context
        assert enc.continuations == (tuple(answer), *(tuple(ids(o)) for o in ex.options))
        assert enc.label == ex.answer_index
        assert domain.input_ids[row, :n].tolist() == context + answer
        assert domain.labels[row].tolist() == [IGNORE] * len(context) + answer + [IGNORE] * (domain.labels.shape[1] - n)
        assert domain.attention_mask[row].tolist() == [1] * n + [0] * (domain.labels.shape[1] - n)
        assert (domain.input_ids[row, n:] == tok.pad_token_id).all()


def test_earliest_shots_are_dropped_until_the_prompt_fits():
    tok = char_tokenizer()
    # one example is 11 chars of prompt+answer; separator 2 chars; prompt 9 chars, answer 2
    full = encode_tasks(tok, examples(), max_len=200, shots=3, seed=0)
    fits_one = encode_tasks(tok, examples(), max_len=9 + 2 + 13 + 2, shots=3, seed=0)
    chosen = shot_indices(4, 3, 0, 0, exclude_self=True)
    last = examples()[chosen[-1]]
    assert len(full[0].context) == 3 * 13 + 9
    assert list(fits_one[0].context) == ids(last.prompt + last.answer + "\n\n" + examples()[0].prompt)
    with pytest.raises(TaskDataError, match="do not fit in 5 tokens even without shots"):
        encode_tasks(tok, examples(), max_len=5, shots=3)


def test_evaluation_examples_draw_shots_from_the_training_pool():
    tok = char_tokenizer()
    train, held_out = examples()[:2], examples()[2:]
    encoded = encode_tasks(tok, held_out, max_len=100, shots=2, seed=1, pool=train)
    for ex, enc in zip(held_out, encoded, strict=True):
        picked = [train[j] for j in shot_indices(2, 2, 1, held_out.index(ex), exclude_self=False)]
        assert list(enc.context) == ids("\n\n".join([*(s.prompt + s.answer for s in picked), ex.prompt]))


def test_lm_domain_labels_every_token_and_domains_validate():
    windows = torch.arange(12).reshape(3, 4)
    d = lm_domain("text", windows)
    assert torch.equal(d.labels, windows) and d.attention_mask.sum().item() == 12 and len(d) == 3
    assert d.rows(torch.tensor([2]))["input_ids"].tolist() == [[8, 9, 10, 11]]
    with pytest.raises(ValueError, match="share one non-empty"):
        Domain("x", windows, windows[:, :3], torch.ones_like(windows))
    with pytest.raises(ValueError, match="no labelled token"):
        Domain("x", windows, torch.full_like(windows, IGNORE), torch.ones_like(windows))


def test_text_domain_reads_a_file_into_windows(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("abcdefghij" * 3)
    d = text_domain("a", char_tokenizer(), path, seq_len=8)
    assert d.input_ids.shape == (3, 8)
    assert d.input_ids[0].tolist() == ids("abcdefgh")


def test_split_is_seeded_disjoint_and_complete():
    many = tuple(TaskExample(f"q{i}", " a") for i in range(10))
    train, held = split_examples(many, 0.3, seed=1)
    assert (len(train), len(held)) == (7, 3)
    assert sorted(train + held, key=lambda e: int(e.prompt[1:])) == list(many)
    assert split_examples(many, 0.3, seed=1) == (train, held)
    assert split_examples(many, 0.3, seed=2) != (train, held)
    with pytest.raises(TaskDataError, match="too few"):
        split_examples(many[:1], 0.5)


def test_read_task_split_is_the_read_then_the_seeded_split_and_checks_before_splitting(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps({"q": str(i), "answer": "a"}) for i in range(10)) + "\n")
    assert read_task_split(path, FMT, seed=3) == split_examples(read_task_jsonl(path, FMT), 0.2, seed=3)
    assert tuple(map(len, read_task_split(path, FMT, seed=3))) == (8, 2)
    seen = []
    read_task_split(path, FMT, seed=3, check=seen.append)
    assert seen == [read_task_jsonl(path, FMT)]  # every example, in file order
    path.write_text(json.dumps({"q": "1", "answer": "a"}) + "\n")

    def refuse(examples):
        raise TaskDataError(f"checked {len(examples)}")

    with pytest.raises(TaskDataError, match="checked 1"):  # the caller's check, not the too-small split, speaks
        read_task_split(path, FMT, check=refuse)
    with pytest.raises(TaskDataError, match="too few"):
        read_task_split(path, FMT)
