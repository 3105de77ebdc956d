"""Option log-likelihood accuracy equals one unpadded forward per option; perplexity as in pruning.metrics."""

from __future__ import annotations

import pytest
import torch

from finetune.data import EncodedTask, TaskFormat, encode_tasks
from finetune.evaluate import EvalData, Evaluation, _scores, evaluate, option_accuracy
from tests.finetune.conftest import char_model, char_tokenizer

FMT = TaskFormat(template="{q} =")
ROWS = [{"q": f"{a}+{b}", "options": [str(a + b), str(a + b + 1), str(a * b)], "answer": 0}
        for a, b in [(1, 2), (2, 5), (3, 3), (4, 1), (6, 2)]]


def slow_score(model, context, option) -> float:
    ids = torch.tensor([context + option])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(context) - 1 + i, tok].item() for i, tok in enumerate(option))


def test_scores_and_accuracy_match_one_forward_per_option():
    model, tok = char_model("qwen2", seed=4), char_tokenizer()
    tasks = encode_tasks(tok, tuple(FMT.example(r) for r in ROWS), max_len=40, shots=2, seed=0)
    pairs = [(t.context, o) for t in tasks for o in t.continuations[1:]]
    expected = torch.tensor([slow_score(model, c, o) for c, o in pairs])
    torch.testing.assert_close(_scores(model, pairs), expected, atol=1e-5, rtol=0)
    best = expected.reshape(len(tasks), 3).argmax(1)
    right = sum(int(b == t.label) for b, t in zip(best.tolist(), tasks, strict=True))
    assert option_accuracy(model, tasks, batch_size=4) == right / len(tasks)


def test_evaluate_reports_perplexity_and_accuracy(windows):
    model = char_model("llama")
    task = EncodedTask(context=(5, 6, 7), continuations=((8,), (8,), (9,)), label=0)
    ids = windows % 86
    got = evaluate(model, EvalData(ids, (task,)))
    with torch.no_grad():  # by hand, from the full logits: exp(mean next-token NLL); option 8 vs option 9
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        next_after_context = model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1]
    assert got.perplexity == pytest.approx(nll.exp().item(), rel=1e-5)
    assert got.task_accuracy == float(next_after_context[8] > next_after_context[9])
    assert Evaluation(12.5).to_dict() == {"perplexity": 12.5}
    assert model.training is False


def test_evaluation_tasks_need_options(windows):
    with pytest.raises(ValueError, match="need options"):
        EvalData(windows, (EncodedTask((1, 2), ((3,),), -1),))
