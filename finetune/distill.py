"""Knowledge from the dense model: per-domain reference losses and precomputed top-k teacher targets.

Teacher memory. The dense model never sits on the device next to the pruned one.
`dense_reference` runs once, *before* the model is sliced, over every training
row (the rows are fixed; dynamic batch loading only chooses among them) and keeps
on the CPU, per position, the teacher's top-k log-probabilities at temperature τ
and the log-mass of everything else:

    log p_K = log softmax(z_T / τ)[top-k],   log p_R = log Σ_{j ∉ top-k} softmax(z_T / τ)_j

so peak device memory is max(dense inference, pruned training), never their sum,
and host memory is N · (T-1) · (8k + 4) bytes (k = 32, 10k rows of 512: 1.3 GB).
The same pass gives the dense loss of every domain, which dynamic batch loading
compares against. (Streaming the dense model each step would double device
memory or its transfer time; running it through the masked dense weights would
keep the dense weights on the device.)

The distillation loss is the KL divergence between the (k+1)-bucket distributions
(top-k tokens, rest), scaled by τ² as in Hinton et al. It is exactly 0 when the
student matches the teacher, and equals the full-vocabulary KL when k = vocab:

    KL = Σ_{i ∈ K ∪ {R}} p_i (log p_i - log q_i),   q = softmax(z_S / τ) bucketed the same way
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from finetune.data import IGNORE, Domain


@dataclass(frozen=True)
class TeacherTargets:
    """One domain's teacher distribution: logprobs, indices (N, T-1, k); rest (N, T-1); position t predicts t+1."""

    logprobs: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor


@dataclass(frozen=True)
class DenseReference:
    """What the dense model leaves behind for recovery: mean NLL per domain, and top-k targets when top_k > 0."""

    losses: dict[str, float]
    temperature: float
    targets: dict[str, TeacherTargets]

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        extra = set(self.targets) - set(self.losses)
        if extra:
            raise ValueError(f"teacher targets for unknown domains {sorted(extra)}")


def bucket_logprobs(logits: torch.Tensor, indices: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """(log q_K (..., k), log q_R (...)) of softmax(logits / τ) for the buckets of `indices`."""
    logz = logits.float() / temperature  # (..., V)
    norm = torch.logsumexp(logz, dim=-1, keepdim=True)
    top = logz.gather(-1, indices) - norm
    rest = torch.logsumexp(logz.scatter(-1, indices, float("-inf")), dim=-1) - norm.squeeze(-1)
    return top, rest


def distill_loss(student_logits: torch.Tensor, targets: TeacherTargets, mask: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """τ² · mean over positions where `mask` (B, T-1) of KL(teacher buckets || student buckets).

    student_logits: (B, T-1, V) logits for the next token at each position.
    """
    q_top, q_rest = bucket_logprobs(student_logits, targets.indices.long(), temperature)
    p_top, p_rest = targets.logprobs, targets.rest
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)  # (B, T-1)
    rest_term = p_rest.exp() * (p_rest - q_rest)
    kl = kl + torch.where(p_rest > float("-inf"), rest_term, torch.zeros_like(rest_term))
    return temperature**2 * kl[mask].mean()


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL per row (B,), labelled tokens per row (B,)) for logits (B, T, V), labels (B, T)."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return nll.sum(1), (targets != IGNORE).sum(1)


def dense_reference(model: PreTrainedModel, domains: list[Domain] | tuple[Domain, ...], top_k: int = 0,
                    temperature: float = 1.0, batch_size: int = 8) -> DenseReference:
    """Run the dense `model` once over every row of `domains` (call it before slicing).

    top_k = 0 records only the per-domain losses (enough for dynamic batch loading);
    top_k > 0 also records teacher targets for distillation.
    """
    vocab = model.get_output_embeddings().out_features
    if not 0 <= top_k < vocab:
        raise ValueError(f"top_k must be in [0, {vocab}) for this vocabulary, got {top_k}")
    was_training = model.training
    model.eval()
    losses, targets = {}, {}
    try:
        for d in domains:
            losses[d.name], parts = _domain_pass(model, d, top_k, temperature, batch_size)
            if top_k:
                targets[d.name] = TeacherTargets(*(torch.cat(x) for x in zip(*parts, strict=True)))
    finally:
        model.train(was_training)
    return DenseReference(losses, temperature, targets)


@torch.inference_mode()
def _domain_pass(model: PreTrainedModel, domain: Domain, top_k: int, temperature: float, batch_size: int):
    """(mean NLL of the domain, [(top logprobs, int32 indices, rest) per batch, on the CPU])."""
    device = next(model.parameters()).device
    total, count, parts = 0.0, 0, []
    for start in tqdm(range(0, len(domain), batch_size), desc=f"dense reference: {domain.name}", leave=False):
        index = torch.arange(start, min(start + batch_size, len(domain)))
        rows = {k: v.to(device) for k, v in domain.rows(index).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits  # (B, T, V)
        nll, n = token_nll(logits, rows["labels"])
        total, count = total + nll.sum().item(), count + n.sum().item()
        if top_k:
            nxt = logits[:, :-1]  # (B, T-1, V)
            indices = nxt.topk(top_k, dim=-1).indices
            top, rest = bucket_logprobs(nxt, indices, temperature)
            parts.append((top.cpu(), indices.int().cpu(), rest.cpu()))
    return total / count, parts
