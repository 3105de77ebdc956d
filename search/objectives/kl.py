"""`kl`: mean KL(dense || candidate) of the next-token distribution over the evaluation windows (minimised).

EvoPress scores candidates by KL to the dense model: it compares whole distributions, not only the
probability of the one observed token, so it separates candidates on fewer windows than perplexity.

Teacher, computed once from the dense model when the objective is built and stored compactly: at each
position the top-k log-probabilities p_S of the dense model (k = 64) and the log of the remaining mass
p_R = 1 - sum_S p_v. The candidate's q is read on the same k tokens and its remaining mass q_R, so

    KL_k = sum_{v in S} p_v (log p_v - log q_v)  +  p_R (log p_R - log q_R)

is the KL between the two distributions with the tail merged into one outcome. By the log-sum inequality
merging outcomes never raises a KL, so KL_k <= KL (a lower bound; equal when k covers the vocabulary, and
close when the dense model puts little mass past its top k). The objective is the mean of KL_k over all
predicted positions of all windows. Storage: N x (T-1) x k x (4 + 8) bytes (32 x 255 x 64 -> 6 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from search.objectives.base import Objective, Score

TOP_K = 64


@dataclass(frozen=True)
class Teacher:
    """Dense model's next-token distribution on (N, T) windows, top-k compressed."""

    windows: torch.Tensor  # (N, T)
    top_logp: torch.Tensor  # (N, T-1, k) float32 log p of the top-k tokens
    top_ids: torch.Tensor  # (N, T-1, k) int64
    rest_logp: torch.Tensor  # (N, T-1) float32 log of the mass outside the top k (-inf when none)

    @classmethod
    @torch.inference_mode()
    def compute(cls, model, windows: torch.Tensor, top_k: int = TOP_K, batch_size: int = 8) -> Teacher:
        device = next(model.parameters()).device
        logps, ids, rests = [], [], []
        for start in range(0, len(windows), batch_size):
            logits = model(input_ids=windows[start : start + batch_size].to(device)).logits[:, :-1]
            logp = torch.log_softmax(logits.float(), -1)  # (B, T-1, V)
            top, index = logp.topk(min(top_k, logp.shape[-1]), dim=-1)  # (B, T-1, k)
            logps.append(top.cpu())
            ids.append(index.cpu())
            rests.append(_rest(logp, index).cpu())
        return cls(windows, torch.cat(logps), torch.cat(ids), torch.cat(rests))


def _rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) log of the mass outside `ids`: a log-sum-exp over the other tokens, exact where
    log(1 - sum of the top k) would cancel; -inf when the top k hold the whole vocabulary."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(-1)


@torch.inference_mode()
def top_k_kl(model, teacher: Teacher, batch_size: int = 8) -> torch.Tensor:
    """(N, T-1) KL_k(dense || model) at every predicted position (module docstring)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(teacher.windows), batch_size):
        rows = slice(start, start + batch_size)
        logits = model(input_ids=teacher.windows[rows].to(device)).logits[:, :-1].float()
        logq_all = torch.log_softmax(logits, -1)  # (B, T-1, V)
        logp, ids = teacher.top_logp[rows].to(device), teacher.top_ids[rows].to(device)
        rest_p = teacher.rest_logp[rows].to(device)  # (B, T-1)
        logq = logq_all.gather(-1, ids)  # (B, T-1, k)
        rest_q = _rest(logq_all, ids)  # (B, T-1)
        head = (logp.exp() * (logp - logq)).sum(-1)
        p_rest = rest_p.exp()
        tail = torch.where(p_rest > 0, p_rest * (rest_p - rest_q), torch.zeros_like(p_rest))
        out.append((head + tail).double().cpu())
    return torch.cat(out)


@dataclass
class KL(Objective):
    teacher: Teacher
    batch_size: int = 8

    name = "kl"
    direction = "minimize"
    needs = ("teacher",)
    relative_cost = 1.1  # measured 1.08x (experiments/task_study.py): a forward pass plus a log-softmax and gathers

    def __call__(self, model) -> Score:
        return Score(float(top_k_kl(model, self.teacher, self.batch_size).mean()))

    @classmethod
    def study_settings(cls, config) -> dict:
        return {"top_k": TOP_K}

    @classmethod
    def from_config(cls, config, setup, split: str, checked=None) -> KL:
        """Reads the dense model: build it before any candidate is masked."""
        windows = setup.search_windows if split == "search" else setup.held_out
        return cls(Teacher.compute(setup.model, windows, batch_size=config.batch_size), config.batch_size)
