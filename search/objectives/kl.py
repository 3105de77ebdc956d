"""`kl`: mean KL(dense || candidate) of the next-token distribution over the evaluation windows (minimised).

EvoPress scores candidates by KL to the dense model: it compares whole distributions, not only the
probability of the one observed token, so it separates candidates on fewer windows than perplexity.

The dense model's distribution is computed once, when the objective is built, and stored compactly as a
`pruning.topk.TopKDistribution`: at each position its top-k log-probabilities (k = 64) and the log of the
remaining mass. The candidate's distribution is read on the same k tokens and the rest, and KL_k (the KL
with the tail merged into one outcome; a lower bound of the KL, equal when k covers the vocabulary, close
when the dense model puts little mass past its top k) is averaged over all predicted positions of all
windows. Storage: N x (T-1) x (8k + 4) bytes (32 x 255 x 64 -> 4 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning.topk import TopKDistribution, top_k_kl
from search.objectives.base import Objective, Score

TOP_K = 64


@torch.inference_mode()
def dense_top_k(model, windows: torch.Tensor, top_k: int = TOP_K, batch_size: int = 8) -> TopKDistribution:
    """The (dense) model's next-token distribution on (N, T) windows, top-k compressed, on the CPU."""
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(windows), batch_size):
        logits = model(input_ids=windows[start : start + batch_size].to(device)).logits[:, :-1]  # (B, T-1, V)
        parts.append(TopKDistribution.of_logits(logits, top_k).to("cpu"))
    return TopKDistribution.cat(parts, dim=0)


@torch.inference_mode()
def kl_per_position(model, windows: torch.Tensor, dense: TopKDistribution, batch_size: int = 8) -> torch.Tensor:
    """(N, T-1) float64 KL_k(dense || model) at every predicted position of `windows`."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(windows), batch_size):
        rows = slice(start, start + batch_size)
        logits = model(input_ids=windows[rows].to(device)).logits[:, :-1]  # (B, T-1, V)
        out.append(top_k_kl(logits, dense.rows(rows).to(device)).double().cpu())
    return torch.cat(out)


@dataclass
class KL(Objective):
    windows: torch.Tensor  # (N, T)
    dense: TopKDistribution  # the dense model's on `windows`
    batch_size: int = 8

    name = "kl"
    direction = "minimize"
    needs = ("teacher",)
    relative_cost = 1.1  # measured 1.08x (experiments/task_study.py): a forward pass plus a log-softmax and gathers

    def __call__(self, model) -> Score:
        return Score(float(kl_per_position(model, self.windows, self.dense, self.batch_size).mean()))

    @classmethod
    def study_settings(cls, config) -> dict:
        return {"top_k": TOP_K}

    @classmethod
    def from_config(cls, config, setup, split: str, checked=None) -> KL:
        """Reads the dense model: build it before any candidate is masked."""
        windows = setup.search_windows if split == "search" else setup.held_out_windows
        return cls(windows, dense_top_k(setup.model, windows, batch_size=config.batch_size), config.batch_size)
