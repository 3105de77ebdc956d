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

and, when there is more than one chunk under autograd, each chunk is wrapped in
activation checkpointing: only its (B, t, H) hidden slice is kept for backward,
and its logits are recomputed there (one more LM-head matmul per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from finetune.data import IGNORE
from pruning.topk import TopKDistribution, top_k_kl

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

    hidden: (B, T, H) final hidden states; labels: (B, T), IGNORE where no loss;
    teacher: targets for the T-1 next-token positions (the KL is 0 without one).
    """
    h, targets = hidden[:, :-1], labels[:, 1:]  # position t predicts token t+1
    step = chunk_positions(h.shape[0], head.out_features)
    nll, kl = h.new_zeros(h.shape[0], dtype=torch.float32), h.new_zeros((), dtype=torch.float32)
    for c in range(0, h.shape[1], step):
        part = slice(c, c + step)
        args = (h[:, part], head, targets[:, part], teacher.positions(part) if teacher else None, temperature)
        if torch.is_grad_enabled() and h.shape[1] > step:
            n, k = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            n, k = _chunk(*args)
        nll, kl = nll + n, kl + k
    return nll, (targets != IGNORE).sum(1), kl


def _chunk(h: torch.Tensor, head: nn.Module, targets: torch.Tensor, teacher: TopKDistribution | None,
           temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(h).float()  # (B, t, V)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none").sum(1)
    if teacher is None:
        return nll, logits.new_zeros(())
    return nll, top_k_kl(logits, teacher, temperature)[targets != IGNORE].sum()
