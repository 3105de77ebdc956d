"""The losses of recovery: next-token NLL and the bucketed distillation KL, from hidden states in chunks.

Distillation compares (k+1)-bucket distributions, the teacher's top-k tokens and
"the rest", at temperature τ, scaled by τ² as in Hinton et al.:

    KL = Σ_{i ∈ K ∪ {R}} p_i (log p_i - log q_i),    p = softmax(z_T / τ), q = softmax(z_S / τ) bucketed alike

It is exactly 0 when the student matches the teacher, and equals the
full-vocabulary KL when k = vocab (the rest bucket is then empty); the buckets
and the KL are `pruning.topk`'s, which the search's `kl` objective also uses.

Chunking. (B, T, V) logits are the largest tensors of LoRA training on a
big-vocabulary model (B=8, T=2048, V=128k: 8.6 GB per fp32 copy, and the loss
keeps several), so the LM head runs on slices of positions

    logits_c = lm_head(h[:, c : c + t])          (B, t, V),  4 · B · t · V bytes <= LOGITS_CHUNK_BYTES

Training (`recovery_loss`) never keeps a chunk's logits for backward: the gradient
of the loss with respect to them has a closed form (below), so each chunk's forward
also computes dL/dh_c = G_c · W at once and keeps only that (B, t, H) slice. Two
LM-head matmuls per chunk (logits, G W) and one pass of elementwise work, where
autograd through checkpointed chunks takes three matmuls and differentiates two
log-softmaxes and the rest bucket's log-sum-exp. With a = (1-λ)/N and b = λ τ²/N
(N labelled tokens), the loss a · Σ NLL + b · Σ KL has, at a labelled position
with target y, s = z/τ, q = softmax(s), q_R = Σ_{j ∉ K} q_j,

    dNLL/dz_j = softmax(z)_j - [j = y]
    dKL/dz_j  = (S_p q_j - [j ∈ K] p_j - [j ∉ K] p_R q_j / q_R) / τ,     S_p = Σ_K p_i + p_R  (≈ 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data import IGNORE
from pruning.topk import TopKDistribution, log_softmax, rest_log_mass, top_k_kl

LOGITS_CHUNK_BYTES = 256 * 2**20


def distill_loss(student_logits: torch.Tensor, teacher: TopKDistribution, mask: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """τ² · mean KL over the positions where `mask` (B, t) is true."""
    return temperature**2 * top_k_kl(student_logits, teacher, temperature)[mask].mean()


def chunk_positions(batch: int, vocab: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (4 * batch * vocab))


def next_token_losses(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                      teacher: TopKDistribution | None = None, temperature: float = 1.0):
    """(NLL summed per row (B,), labelled tokens per row (B,), KL summed over labelled positions ()).

    For measuring (no gradient is kept from one chunk to the next; training uses `recovery_loss`).
    hidden: (B, T, H) final hidden states; labels: (B, T), IGNORE where no loss;
    teacher: targets for the T-1 next-token positions (the KL is 0 without one).
    """
    h, targets = hidden[:, :-1], labels[:, 1:]  # position t predicts token t+1
    step = chunk_positions(h.shape[0], head.out_features)
    nll, kl = h.new_zeros(h.shape[0], dtype=torch.float32), h.new_zeros((), dtype=torch.float32)
    for c in range(0, h.shape[1], step):
        part = slice(c, c + step)
        logits = head(h[:, part]).float()  # (B, t, V)
        nll = nll + F.cross_entropy(logits.transpose(1, 2), targets[:, part], ignore_index=IGNORE,
                                    reduction="none").sum(1)
        if teacher is not None:
            kl = kl + top_k_kl(logits, teacher.positions(part), temperature)[targets[:, part] != IGNORE].sum()
    return nll, (targets != IGNORE).sum(1), kl


@dataclass(frozen=True)
class RecoveryLoss:
    loss: torch.Tensor  # () (1-λ) · mean NLL + λ τ² · mean KL, differentiable in the hidden states (and head)
    nll: torch.Tensor  # (B,) NLL summed per row, detached
    tokens: torch.Tensor  # (B,) labelled tokens per row
    kl: torch.Tensor  # () KL summed over labelled positions, detached (0 without a teacher)


def recovery_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, teacher: TopKDistribution | None,
                  temperature: float, distill_weight: float) -> RecoveryLoss:
    """The training loss of one batch, its gradient computed chunk by chunk in the forward (module docstring).

    hidden: (B, T, H) final hidden states; labels: (B, T), IGNORE where no loss; teacher: targets for the
    T-1 next-token positions, needed when distill_weight (λ) > 0. The head has no bias (LLaMA's never does).
    """
    if head.bias is not None:
        raise ValueError("recovery_loss needs an LM head without a bias")
    if distill_weight > 0 and teacher is None:
        raise ValueError("distill_weight > 0 needs teacher targets")
    targets = labels[:, 1:]
    tokens = (targets != IGNORE).sum(1)
    count = tokens.sum().clamp(min=1).item()
    scales = ((1 - distill_weight) / count, distill_weight * temperature**2 / count)
    buckets = (None,) * 3 if teacher is None else (teacher.top_logp, teacher.top_ids, teacher.rest_logp)
    loss, nll, kl = _FusedHeadLoss.apply(hidden[:, :-1], head.weight, targets, *buckets, scales, temperature)
    return RecoveryLoss(loss, nll, tokens, kl)


class _FusedHeadLoss(torch.autograd.Function):
    """(loss (), NLL per row (B,), KL sum ()) of (B, t, H) hidden states; only the loss carries a gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, top_logp, top_ids, rest_logp, scales, temperature):
        step = chunk_positions(h.shape[0], weight.shape[0])
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        nll = h.new_zeros(h.shape[0], dtype=torch.float32)
        kl = h.new_zeros((), dtype=torch.float32)
        for c in range(0, h.shape[1], step):
            part = slice(c, c + step)
            teacher = None if top_ids is None else (top_logp[:, part], top_ids[:, part], rest_logp[:, part])
            hc = h[:, part]
            g, n, k = _chunk_gradient(F.linear(hc, weight).float(), targets[:, part], teacher, scales, temperature)
            g = g.to(weight.dtype)
            grad_h[:, part] = g @ weight  # (B, t, H)
            if grad_w is not None:
                grad_w += (g.flatten(0, 1).T @ hc.flatten(0, 1)).float()  # (V, H)
            nll, kl = nll + n, kl + k
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(nll, kl)
        loss = scales[0] * nll.sum() + scales[1] * kl
        return loss, nll, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_kl):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_loss * grad_h, None if grad_w is None else (grad_loss * grad_w).to(grad_h.dtype),
                None, None, None, None, None, None)


def _chunk_gradient(z: torch.Tensor, targets: torch.Tensor, teacher, scales: tuple[float, float], tau: float):
    """(dL/dz (B, t, V), NLL per row (B,), KL sum ()) of float32 logits z (B, t, V), in place where it can."""
    labelled = targets != IGNORE  # (B, t)
    y = targets.masked_fill(~labelled, 0).unsqueeze(-1)  # (B, t, 1)
    a = scales[0] * labelled  # (B, t) the NLL's weight per position
    logq1 = log_softmax(z)
    nll = -(logq1.gather(-1, y).squeeze(-1) * labelled).sum(1)
    if teacher is None:
        grad = logq1.exp_().mul_(a.unsqueeze(-1))
        return grad.scatter_add_(-1, y, -a.unsqueeze(-1)), nll, z.new_zeros(())
    logp, ids, rest_p = teacher[0], teacher[1].long(), teacher[2]  # (B, t, k), (B, t, k), (B, t)
    logq = logq1 if tau == 1 else log_softmax(z, tau)
    logq_k, logq_r = logq.gather(-1, ids), rest_log_mass(logq, ids)  # (B, t, k), (B, t)
    p, p_r = logp.exp(), rest_p.exp()
    has_rest = p_r > 0  # an empty rest bucket (k = V) adds nothing, and its q_R may be 0
    kl_pos = (p * (logp - logq_k)).sum(-1) + torch.where(has_rest, p_r * (rest_p - logq_r), 0)
    kl = (kl_pos * labelled).sum()
    b = scales[1] / tau * labelled  # (B, t) the KL's weight per position, with dz = ds / τ
    s_p = p.sum(-1) + p_r
    rest_share = (logq - torch.where(has_rest, logq_r, 0).unsqueeze(-1)).exp_().scatter_(-1, ids, 0)  # q_j/q_R off K
    grad = logq.exp() * (b * s_p).unsqueeze(-1) - rest_share.mul_((b * p_r).unsqueeze(-1))
    grad.scatter_add_(-1, ids, -(b.unsqueeze(-1) * p))
    grad += (logq1 if tau == 1 else log_softmax(z)).exp_().mul_(a.unsqueeze(-1))
    return grad.scatter_add_(-1, y, -a.unsqueeze(-1)), nll, kl
