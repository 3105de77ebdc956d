"""Perplexity, per-window NLL and KL to a reference distribution, over fixed-length token windows."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def perplexity(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8, token_chunk: int = 4096,
               progress: str | None = None) -> float:
    """exp(mean next-token NLL) over `windows` (N, T); bf16 autocast on CUDA. `progress`: show a progress bar
    with this label (for the long held-out measurements of a real model).

    The LM head runs on chunks of `token_chunk` positions so (B*T, vocab) logits of
    a large-vocabulary model are never materialised at once.
    """
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        starts = range(0, len(windows), batch_size)
        for start in tqdm(starts, desc=progress, unit="batch", leave=False, disable=progress is None):
            batch = windows[start : start + batch_size].to(device)
            hidden = model.get_decoder()(input_ids=batch).last_hidden_state[:, :-1]  # (B, T-1, H)
            hidden, targets = hidden.reshape(-1, hidden.shape[-1]), batch[:, 1:].reshape(-1)
            for c in range(0, len(targets), token_chunk):
                logits = head(hidden[c : c + token_chunk]).float()  # (chunk, V)
                total += F.cross_entropy(logits, targets[c : c + token_chunk], reduction="sum").item()
            count += len(targets)
    nll = total / count
    return math.exp(nll) if nll < 700 else math.inf


@torch.inference_mode()
def next_token_logprobs(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N, T-1, V) float32 log-probabilities of the model's next-token distribution, on the CPU.

    Held in full, so meant for the few windows a sensitivity database or a KL objective uses
    (8 windows x 255 tokens x 32k vocab = 261 MB).
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(windows), batch_size):
        logits = model(input_ids=windows[start : start + batch_size].to(device)).logits[:, :-1]  # (B, T-1, V)
        out.append(torch.log_softmax(logits.float(), -1).cpu())
    return torch.cat(out)


@torch.inference_mode()
def window_losses(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8, reference: torch.Tensor | None = None,
    logits_of: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Per-window means over the T-1 predicted positions, each (N,):

        "nll": -log q(x_t+1 | x_<=t)                        (perplexity = exp(mean of the windows' nll))
        "kl":  sum_v p_v (log p_v - log q_v), p = `reference` (N, T-1, V) log-probs of the dense model

    `logits_of(k, batch)`: the (B, T, V) logits of the k-th batch (B, T) of `windows`; default the model's forward.
    """
    device = next(model.parameters()).device
    nll, kl = [], []
    for k, start in enumerate(range(0, len(windows), batch_size)):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits if logits_of is None else logits_of(k, batch)
        logq = torch.log_softmax(logits[:, :-1].float(), -1)  # (B, T-1, V)
        nll.append(-logq.gather(-1, batch[:, 1:, None]).squeeze(-1).mean(-1).double().cpu())
        if reference is not None:
            logp = reference[start : start + batch_size].to(device)
            kl.append((logp.exp() * (logp - logq)).sum(-1).mean(-1).double().cpu())
    out = {"nll": torch.cat(nll).numpy()}
    if reference is not None:
        out["kl"] = torch.cat(kl).numpy()
    return out
