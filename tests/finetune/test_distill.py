"""Bucketed KL: zero for identical models, full KL when k covers the vocabulary; chunked losses; dense reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finetune import losses
from finetune.data import lm_domain
from finetune.distill import dense_reference
from finetune.losses import distill_loss, next_token_losses
from pruning.metrics import perplexity
from pruning.topk import TopKDistribution
from tests.finetune.conftest import char_model


def test_kl_is_zero_when_student_is_the_teacher():
    logits = torch.randn(2, 5, 30, generator=torch.Generator().manual_seed(0)) * 3
    mask = torch.ones(2, 5, dtype=torch.bool)
    teacher = TopKDistribution.of_logits(logits, 4, 2.0)
    assert distill_loss(logits, teacher, mask, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_with_every_token_in_the_top_k_is_the_full_kl():
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(2, 5, 30, generator=g), torch.randn(2, 5, 30, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    tau = 1.5
    full = F.kl_div((student / tau).log_softmax(-1), (teacher / tau).log_softmax(-1), log_target=True,
                    reduction="none").sum(-1).mean() * tau**2
    got = distill_loss(student, TopKDistribution.of_logits(teacher, 30, tau), mask, tau)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=0)


def test_bucketed_kl_is_positive_below_the_full_kl_and_respects_the_mask():
    g = torch.Generator().manual_seed(2)
    teacher, student = torch.randn(1, 4, 30, generator=g), torch.randn(1, 4, 30, generator=g)
    full = distill_loss(student, TopKDistribution.of_logits(teacher, 30, 1.0), torch.ones(1, 4, dtype=torch.bool), 1.0)
    top4 = distill_loss(student, TopKDistribution.of_logits(teacher, 4, 1.0), torch.ones(1, 4, dtype=torch.bool), 1.0)
    assert 0 < top4.item() < full.item()
    first = torch.tensor([[True, False, False, False]])
    only_first = distill_loss(student[:, :1], TopKDistribution.of_logits(teacher[:, :1], 4, 1.0), first[:, :1], 1.0)
    top4_first = distill_loss(student, TopKDistribution.of_logits(teacher, 4, 1.0), first, 1.0)
    torch.testing.assert_close(top4_first, only_first)


def test_dense_reference_loss_is_log_perplexity_and_targets_have_their_shapes(windows):
    windows = windows % 86
    model = char_model("llama")
    ref = dense_reference(model, [lm_domain("a", windows[:4]), lm_domain("b", windows[4:])], top_k=5,
                          temperature=2.0, batch_size=3)
    assert ref.losses["a"] == pytest.approx(math.log(perplexity(model, windows[:4])), abs=1e-5)
    assert ref.losses["b"] == pytest.approx(math.log(perplexity(model, windows[4:])), abs=1e-5)
    t = ref.targets["a"]
    assert t.top_logp.shape == (4, 15, 5) and t.top_ids.shape == (4, 15, 5) and t.rest_logp.shape == (4, 15)
    total = torch.cat([t.top_logp, t.rest_logp[..., None]], dim=-1).logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)
    assert dense_reference(model, [lm_domain("a", windows)]).targets == {}
    with pytest.raises(ValueError, match="top_k must be in"):
        dense_reference(model, [lm_domain("a", windows)], top_k=86)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_reference_targets_and_losses_come_from_one_head_pass_equal_to_the_models_logits(windows, temperature):
    windows = windows[:5] % 86
    model = char_model("llama")
    ref = dense_reference(model, [lm_domain("a", windows)], top_k=7, temperature=temperature, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    want = TopKDistribution.of_logits(logits, 7, temperature)
    got = ref.targets["a"]
    torch.testing.assert_close(got.top_logp, want.top_logp, atol=1e-5, rtol=0)
    assert torch.equal(got.top_ids, want.top_ids)
    torch.testing.assert_close(got.rest_logp, want.rest_logp, atol=1e-5, rtol=0)
    nll = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert ref.losses["a"] == pytest.approx(nll.item(), abs=1e-5)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_chunked_losses_equal_the_whole_logits_computation(monkeypatch, with_teacher):
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(6, 30, bias=False)
    hidden = torch.randn(2, 9, 6, generator=g)
    labels = torch.randint(0, 30, (2, 9), generator=g)
    labels[0, :4] = -100
    teacher = TopKDistribution.of_logits(torch.randn(2, 8, 30, generator=g), 5, 2.0) if with_teacher else None
    results = []
    for chunk_bytes in (losses.LOGITS_CHUNK_BYTES, 4 * 2 * 30 * 3):  # one chunk; chunks of 3 positions
        monkeypatch.setattr(losses, "LOGITS_CHUNK_BYTES", chunk_bytes)
        results.append(next_token_losses(hidden, head, labels, teacher, 2.0))
    assert losses.chunk_positions(2, 30) == 3
    for whole, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    logits = head(hidden[:, :-1])
    expected = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none").sum(1)
    torch.testing.assert_close(results[0][0], expected.detach(), atol=1e-6, rtol=0)
    assert results[0][1].tolist() == [5, 8]
    if with_teacher:
        mask = labels[:, 1:] != -100
        torch.testing.assert_close(results[0][2] / 13, distill_loss(logits, teacher, mask, 2.0) / 4, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("distill_weight", "tau", "k", "train_head"),
                         [(0.0, 1.0, 5, False), (0.5, 1.0, 5, False), (0.7, 2.0, 5, True), (0.5, 1.5, 30, False)])
def test_fused_recovery_loss_and_its_gradients_equal_autograd_through_the_logits(monkeypatch, distill_weight, tau, k,
                                                                                 train_head):
    """The closed-form gradient (chunks of 3 positions) against autograd on whole logits; k = 30 = V: empty rest."""
    g = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(6, 30, bias=False).double().float()
    head.weight.requires_grad_(train_head)
    hidden = torch.randn(2, 9, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (2, 9), generator=g)
    labels[0, :4] = -100
    teacher = TopKDistribution.of_logits(3 * torch.randn(2, 8, 30, generator=g), k, tau)
    logits = head(hidden[:, :-1])
    mask = labels[:, 1:] != -100
    nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none").sum(1)
    kl = (losses.top_k_kl(logits, teacher, tau) * mask).sum()
    expected = (1 - distill_weight) * nll.sum() / 13 + distill_weight * tau**2 * kl / 13
    wanted = [hidden, head.weight] if train_head else [hidden]
    expected_grads = torch.autograd.grad(expected, wanted)
    monkeypatch.setattr(losses, "LOGITS_CHUNK_BYTES", 4 * 2 * 30 * 3)
    got = losses.recovery_loss(hidden, head, labels, teacher, tau, distill_weight)
    grads = torch.autograd.grad(2.0 * got.loss, wanted)  # an upstream factor reaches every gradient
    torch.testing.assert_close(got.loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.nll, nll.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.kl, kl.detach(), atol=1e-5, rtol=1e-5)
    assert got.tokens.tolist() == [5, 8] and not got.nll.requires_grad
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, 2.0 * want, atol=1e-6, rtol=1e-5)
