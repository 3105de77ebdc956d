"""search.objectives: each objective equals its definition computed directly on a tiny model."""

import pytest
import torch

from pruning.metrics import perplexity
from search.config import ConfigError, RunConfig
from search.objectives import KL, REGISTRY, ObjectiveError, Perplexity, Score, kind, objective_class
from search.objectives.kl import dense_top_k, kl_per_position
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def models():
    return tiny_model(seed=0), tiny_model(seed=1)


def direct_kl(dense, other, windows) -> torch.Tensor:
    """(N, T-1) sum_v p_v (log p_v - log q_v) over the whole vocabulary."""
    with torch.no_grad():
        logp = dense(input_ids=windows).logits[:, :-1].log_softmax(-1)
        logq = other(input_ids=windows).logits[:, :-1].log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def merged_tail_kl(dense, other, windows, k) -> torch.Tensor:
    """The KL between the two distributions with every token outside the dense top k merged into one."""
    with torch.no_grad():
        p = dense(input_ids=windows).logits[:, :-1].softmax(-1).double()
        q = other(input_ids=windows).logits[:, :-1].softmax(-1).double()
    top = p.topk(k, -1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    p_rest, q_rest = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    return (p_top * (p_top / q_top).log()).sum(-1) + p_rest * (p_rest / q_rest).log()


def test_kl_with_the_whole_vocabulary_is_the_exact_kl(models, windows):
    dense, other = models
    teacher = dense_top_k(dense, windows, top_k=97, batch_size=4)
    expected = direct_kl(dense, other, windows)
    got = kl_per_position(other, windows, teacher, batch_size=4)
    torch.testing.assert_close(got, expected.double(), atol=1e-5, rtol=1e-4)
    assert KL(windows, teacher, 4)(other).value == pytest.approx(expected.mean().item(), rel=1e-4)


def test_top_k_kl_merges_the_tail_and_is_a_lower_bound(models, windows):
    dense, other = models
    teacher = dense_top_k(dense, windows, top_k=5, batch_size=4)
    assert teacher.top_logp.shape == teacher.top_ids.shape == (6, 15, 5) and teacher.rest_logp.shape == (6, 15)
    got = kl_per_position(other, windows, teacher, batch_size=4)
    torch.testing.assert_close(got, merged_tail_kl(dense, other, windows, 5), atol=1e-5, rtol=1e-4)
    assert (got <= direct_kl(dense, other, windows).double() + 1e-6).all()
    assert got.mean() > 0


def test_kl_of_the_dense_model_to_itself_is_zero(models, windows):
    dense, _ = models
    assert KL(windows, dense_top_k(dense, windows, top_k=64), 8)(dense).value == pytest.approx(0.0, abs=1e-6)


def test_perplexity_objective_is_the_perplexity(models, windows):
    dense, _ = models
    assert Perplexity(windows, 4)(dense) == Score(perplexity(dense, windows, 4))


def test_the_registry_declares_direction_needs_and_cost():
    shipped = ("perplexity", "kl", "task", "lm-eval")  # the conformance suite registers a toy beside them
    assert {name: (REGISTRY[name].direction, REGISTRY[name].needs) for name in shipped} == {
        "perplexity": ("minimize", ()),
        "kl": ("minimize", ("teacher",)),
        "task": ("maximize", ("labels",)),
        "lm-eval": ("maximize", ("labels",)),
    }
    assert REGISTRY["perplexity"].relative_cost == 1.0
    assert all(cls.relative_cost >= 1.0 for cls in REGISTRY.values())
    assert kind("lm-eval:a,b") == "lm-eval" and objective_class("task").companions == {
        "acc_norm": "maximize", "margin": "maximize"}
    with pytest.raises(ObjectiveError, match="unknown objective 'bleu'"):
        kind("bleu")


def test_score_lists_the_value_and_companions_under_the_objective_name():
    score = Score(0.5, {"margin": -1.25})
    assert score.flat("task") == {"task": 0.5, "task/margin": -1.25}
    assert score.get("value") == 0.5 and score.get("margin") == -1.25
    with pytest.raises(ObjectiveError, match="give --predictor-target value, acc_norm, margin"):
        objective_class("task").target_direction("bleu")


@pytest.mark.parametrize("settings, message", [
    (dict(objective="task"), "--objective task needs --task"),
    (dict(objective="bleu"), "unknown objective 'bleu'"),
    (dict(predictor_target="margin"), "--predictor-target margin is the task objective's companion"),
    (dict(objective="task", task="t.jsonl", predictor_target="loss"), "unknown --predictor-target 'loss'"),
    (dict(task_search_examples=0), "--task-search-examples and --eval-limit must be at least 1"),
])
def test_config_refuses_objective_settings_it_cannot_use(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**settings)
