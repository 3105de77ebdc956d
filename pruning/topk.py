"""The dense model's next-token distribution, top-k compressed, and the KL of another model's to it.

At each position the dense model's softmax at temperature τ is kept as k + 1 buckets: its top-k tokens S
and "the rest" R,

    log p_S = log softmax(z_T / τ)[S],    log p_R = log Σ_{v ∉ S} softmax(z_T / τ)_v

A candidate's logits z are read on the same buckets (q = softmax(z / τ)), and

    KL_k = Σ_{v ∈ S} p_v (log p_v - log q_v)  +  p_R (log p_R - log q_R)

is the KL between the two distributions with the tail merged into one outcome. By the log-sum inequality
merging outcomes never raises a KL, so KL_k <= KL: 0 when the candidate is the dense model, and the
full-vocabulary KL when k covers the vocabulary (R is then empty and adds 0).

Storage: (4 + 4) k + 4 bytes per position (float32 log-probabilities, int32 token ids, the rest).
The search's `kl` objective (k = 64, τ = 1) and recovery's distillation (k = 32, any τ) both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class TopKDistribution:
    """Top-k buckets of a next-token distribution at each position (leading dims (N, T-1), or a slice)."""

    top_logp: torch.Tensor  # (N, T-1, k) float32 log p of the top-k tokens
    top_ids: torch.Tensor  # (N, T-1, k) int32 their token ids
    rest_logp: torch.Tensor  # (N, T-1) float32 log of the mass outside the top k (-inf when none)

    def __post_init__(self) -> None:
        if self.top_ids.shape != self.top_logp.shape or self.rest_logp.shape != self.top_logp.shape[:-1]:
            raise ValueError(f"top_logp {tuple(self.top_logp.shape)} and top_ids {tuple(self.top_ids.shape)} must "
                             f"be (..., k) and rest_logp {tuple(self.rest_logp.shape)} their (...)")

    @classmethod
    def of_logits(cls, logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKDistribution:
        """Buckets of softmax(logits / τ), logits (..., V); on the logits' device (k is capped at V)."""
        return cls.of_log_probs(log_softmax(logits, temperature), k)

    @classmethod
    def of_log_probs(cls, logp: torch.Tensor, k: int) -> TopKDistribution:
        """Buckets of a float32 log-distribution (..., V) already normalised (k is capped at V)."""
        top, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (..., k)
        return cls(top, ids.int(), rest_log_mass(logp, ids))

    @classmethod
    def cat(cls, parts: Sequence[TopKDistribution], dim: int) -> TopKDistribution:
        """Join along `dim` (0: rows, 1: positions) of the (N, T-1) leading dims."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts], dim) for f in fields(cls)))

    def rows(self, part: slice) -> TopKDistribution:
        return TopKDistribution(self.top_logp[part], self.top_ids[part], self.rest_logp[part])

    def positions(self, part: slice) -> TopKDistribution:
        return TopKDistribution(self.top_logp[:, part], self.top_ids[:, part], self.rest_logp[:, part])

    def to(self, device: torch.device | str) -> TopKDistribution:
        return TopKDistribution(*(getattr(self, f.name).to(device) for f in fields(self)))


def log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / τ) in float32 (dividing by τ = 1 is exact)."""
    return torch.log_softmax(logits.float() / temperature, -1)


def top_k_kl(logits: torch.Tensor, dense: TopKDistribution, temperature: float = 1.0) -> torch.Tensor:
    """(...,) KL_k(dense || softmax(logits / τ)) at each position (module docstring), logits (..., V)."""
    logq_all = log_softmax(logits, temperature)  # (..., V)
    ids = dense.top_ids.long()
    logq, rest_q = logq_all.gather(-1, ids), rest_log_mass(logq_all, ids)  # (..., k), (...)
    logp, rest_p = dense.top_logp, dense.rest_logp
    head = (logp.exp() * (logp - logq)).sum(-1)
    p_rest = rest_p.exp()
    return head + torch.where(p_rest > 0, p_rest * (rest_p - rest_q), torch.zeros_like(p_rest))  # empty rest: 0


def rest_log_mass(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(...) log of the mass outside `ids`: a log-sum-exp over the other tokens, exact where
    log(1 - sum of the top k) would cancel; -inf when the top k hold the whole vocabulary."""
    return logp.scatter(-1, ids.long(), float("-inf")).logsumexp(-1)
