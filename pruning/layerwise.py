"""Run a decoder one layer at a time: catch the hidden states entering layer 0, then call layers directly.

What the model's own forward does between the embedding and the head is: compute the rotary embeddings, the
attention mask and the positions once, then call each layer on the hidden states with them. Catching those at
layer 0 (`layer_inputs`) lets a caller keep the stream entering any layer and restart from it, which is exact:
the same layers run on the same tensors with the same keyword arguments (one mask for every layer, so models
whose layers differ in attention type, such as sliding-window Qwen2 layers, are not run this way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from pruning import adapter


class Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs has been seen."""


@dataclass
class Batch:
    """One batch of windows entering the current layer, and the keyword arguments every layer gets (rotary
    embeddings, mask, positions)."""

    hidden: torch.Tensor  # (B, T, hidden)
    kwargs: dict


def layer_inputs(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> list[Batch]:
    """The batches of `windows` (N, T) as they enter layer 0."""
    device = next(model.parameters()).device
    first = adapter.decoder_layers(model)[0]
    seen = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append(Batch(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except Stop:
                pass
    finally:
        handle.remove()
    return seen


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def logits_from(model: PreTrainedModel, first: int, batch: Batch) -> torch.Tensor:
    """(B, T, V) logits of the model run from layer `first` on, on `batch`'s hidden states entering it."""
    hidden = batch.hidden
    for layer in adapter.decoder_layers(model)[first:]:
        hidden = run_layer(layer, hidden, batch.kwargs)
    return model.get_output_embeddings()(adapter.final_norm(model)(hidden))
