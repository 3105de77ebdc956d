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

The loss that consumes these targets is in `finetune.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from finetune.data import IGNORE, Domain
from finetune.losses import chunk_positions, next_token_losses
from pruning.topk import TopKDistribution, log_softmax


@dataclass(frozen=True)
class DenseReference:
    """What the dense model leaves behind for recovery: mean NLL per domain, and top-k targets when top_k > 0."""

    losses: dict[str, float]
    temperature: float
    targets: dict[str, TopKDistribution]

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        extra = set(self.targets) - set(self.losses)
        if extra:
            raise ValueError(f"teacher targets for unknown domains {sorted(extra)}")


def dense_reference(model: PreTrainedModel, domains: Sequence[Domain], top_k: int = 0,
                    temperature: float = 1.0, batch_size: int = 8) -> DenseReference:
    """Run the dense `model` once over every row of `domains` (call it before slicing).

    top_k = 0 records only the per-domain losses (enough for dynamic batch loading);
    top_k > 0 also records teacher targets for distillation.
    """
    vocab = model.get_output_embeddings().out_features
    if not 0 <= top_k < vocab:
        raise ValueError(f"top_k must be in [0, {vocab}) for this vocabulary, got {top_k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    was_training = model.training
    model.eval()
    losses, targets = {}, {}
    try:
        for d in domains:
            losses[d.name], parts = _domain_pass(model, d, top_k, temperature, batch_size)
            if top_k:
                targets[d.name] = TopKDistribution.cat(parts, dim=0)
    finally:
        model.train(was_training)
    return DenseReference(losses, temperature, targets)


@torch.inference_mode()
def _domain_pass(model: PreTrainedModel, domain: Domain, top_k: int, temperature: float, batch_size: int):
    """(mean NLL of the domain, [teacher buckets of each batch, on the CPU])."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    total, count, parts = 0.0, 0, []
    for start in tqdm(range(0, len(domain), batch_size), desc=f"dense reference: {domain.name}", leave=False):
        index = torch.arange(start, min(start + batch_size, len(domain)))
        rows = {k: v.to(device) for k, v in domain.rows(index).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model.get_decoder()(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                                         use_cache=False).last_hidden_state  # (B, T, H)
            if top_k:
                nll, n, buckets = _losses_and_top_k(hidden, head, rows["labels"], top_k, temperature)
                parts.append(buckets)
            else:
                nll, n, _ = next_token_losses(hidden, head, rows["labels"])
        total, count = total + nll.sum().item(), count + n.sum().item()
    return total / count, parts


def _losses_and_top_k(hidden: torch.Tensor, head, labels: torch.Tensor, k: int, temperature: float):
    """(NLL summed per row (B,), labelled tokens per row (B,), teacher buckets of every next-token position on the
    CPU) of (B, T, H) final hidden states: one LM-head pass and, at τ = 1, one log-softmax per chunk serve both."""
    h, targets = hidden[:, :-1], labels[:, 1:]  # position t predicts token t+1
    step = chunk_positions(h.shape[0], head.out_features)
    nll, pieces = h.new_zeros(h.shape[0], dtype=torch.float32), []
    for c in range(0, h.shape[1], step):
        part = slice(c, c + step)
        logits = head(h[:, part]).float()  # (B, t, V)
        logp = log_softmax(logits)
        labelled = targets[:, part] != IGNORE
        y = targets[:, part].masked_fill(~labelled, 0).unsqueeze(-1)  # (B, t, 1)
        nll = nll - (logp.gather(-1, y).squeeze(-1) * labelled).sum(1)
        tempered = logp if temperature == 1 else log_softmax(logits, temperature)
        pieces.append(TopKDistribution.of_log_probs(tempered, k).to("cpu"))
    return nll, (targets != IGNORE).sum(1), TopKDistribution.cat(pieces, dim=1)
