"""Perplexity over fixed-length token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def perplexity(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8, token_chunk: int = 4096) -> float:
    """exp(mean next-token NLL) over `windows` (N, T); bf16 autocast on CUDA.

    The LM head runs on chunks of `token_chunk` positions so (B*T, vocab) logits of
    a large-vocabulary model are never materialised at once.
    """
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            hidden = model.get_decoder()(input_ids=batch).last_hidden_state[:, :-1]  # (B, T-1, H)
            hidden, targets = hidden.reshape(-1, hidden.shape[-1]), batch[:, 1:].reshape(-1)
            for c in range(0, len(targets), token_chunk):
                logits = head(hidden[c : c + token_chunk]).float()  # (chunk, V)
                total += F.cross_entropy(logits, targets[c : c + token_chunk], reduction="sum").item()
            count += len(targets)
    nll = total / count
    return math.exp(nll) if nll < 700 else math.inf
