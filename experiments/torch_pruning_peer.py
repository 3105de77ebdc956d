"""Torch-Pruning's LLM recipe (examples/LLMs/prune_llm.py of VainF/Torch-Pruning), as a peer we did not write.

The recipe prunes every layer by the same ratio with `BasePruner` and data-free
`GroupMagnitudeImportance(p=2)`: the hidden size (embeddings, norms, every
projection), FFN channels and whole attention heads (`prune_head_dims=False`),
rounded to multiples of 4. It then rewrites the config so stock `transformers`
runs the result. Three adaptations, all forced (the first two change nothing that is pruned):

- Torch-Pruning 1.6 never finishes tracing q/k/v through the rotary embedding of
  transformers 5 (VainF/Torch-Pruning#527), so the dependency graph is traced
  with RoPE as the identity. RoPE mixes channels only within a head, and whole
  heads are pruned, so the coupling of channels is the same.
- With grouped-query attention, the query heads must stay a multiple of the KV
  heads (the recipe's README gives the same rule), so the head ratio is rounded
  to the nearest allowed one.
- Its head scoring views the KV projections' importance (KV heads x head_dim values)
  as one row per *query* head, which fails where that width is no multiple of the
  query heads (SmolLM2: 3 x 64 = 192 over 9 heads). There the recipe keeps every
  head: q/k/v are left out (`ignored_layers`), so it prunes the hidden size and the
  FFN channels only. `head_scoring_fails` says when.

`prune_to_params` bisects the ratio so the result has as many parameters as the
budget allows, like every other method of `experiments.compare`.
"""

from __future__ import annotations

import copy
import sys
import warnings
from unittest import mock

import torch
from transformers import PreTrainedModel

from pruning import adapter


def _identity_rope(q, k, *args, **kwargs):
    return q, k


def allowed_head_ratio(config, ratio: float) -> float:
    """The head-pruning ratio nearest `ratio` that leaves whole KV groups (GQA keeps its KV heads; MHA prunes
    q, k and v heads together)."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    step = kv / heads if kv != heads else 1 / heads
    return min(round(ratio / step) * step, 1 - step)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def head_scoring_fails(config) -> bool:
    """Whether Torch-Pruning 1.6 cannot score heads here: it reshapes KV-width importance into query-head rows."""
    return config.num_key_value_heads * _head_dim(config) % config.num_attention_heads != 0


def prune(model: PreTrainedModel, ratio: float, head_ratio: float | None = None) -> PreTrainedModel:
    """Prune `model` in place with the recipe at `ratio` (share of width removed); return it."""
    import torch_pruning as tp

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = _head_dim(cfg)
    keep_heads = head_scoring_fails(cfg)
    head_ratio = 0.0 if keep_heads else allowed_head_ratio(cfg, ratio) if head_ratio is None else head_ratio
    layers = adapter.decoder_layers(model)
    num_heads, ignored = {}, [model.get_output_embeddings()]
    for layer in layers:
        parts = adapter.layer_parts(layer)
        if keep_heads:
            ignored += [parts.q, parts.k, parts.v]
        else:
            num_heads.update({parts.q: heads, parts.k: kv, parts.v: kv})
    modeling = sys.modules[type(layers[0].self_attn).__module__]
    with mock.patch.object(modeling, "apply_rotary_pos_emb", _identity_rope), warnings.catch_warnings():
        # The norms' weights are "unwrapped parameters" to it; it prunes them along the hidden size, as it should.
        warnings.filterwarnings("ignore", message="Unwrapped parameters", category=UserWarning)
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs=torch.zeros(1, 8, dtype=torch.long, device=next(model.parameters()).device),
            importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False,
            output_transform=lambda out: out.logits,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            num_heads=num_heads,
            prune_num_heads=not keep_heads,
            prune_head_dims=False,
            head_pruning_ratio=head_ratio,
            round_to=4,
        )
    for group in pruner.step(interactive=True):
        group.prune()
    # What the recipe does after pruning: make the config and attention modules describe the new shapes.
    parts = adapter.layer_parts(layers[0])
    new_heads, new_kv = parts.q.out_features // head_dim, parts.k.out_features // head_dim
    for layer in layers:
        layer.self_attn.num_key_value_groups = new_heads // new_kv
    cfg.hidden_size = model.get_output_embeddings().in_features
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = new_heads, new_kv, head_dim
    cfg.intermediate_size = parts.gate.out_features
    return model


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bisect(dense: PreTrainedModel, budget: int, head_ratio: float | None, steps: int):
    lo, hi = 0.0, 0.95  # params(lo) > budget >= params(hi); params fall as the ratio grows
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = prune(copy.deepcopy(dense), mid, head_ratio)
        if count(candidate) <= budget:
            hi, best = mid, candidate
        else:
            lo = mid
    if best is None:
        raise ValueError(f"Torch-Pruning cannot bring {count(dense):,} parameters down to {budget:,}")
    return best, hi


def prune_to_params(dense: PreTrainedModel, budget: int, steps: int = 12) -> tuple[PreTrainedModel, float, float]:
    """A pruned copy of `dense` with the most parameters <= `budget`: (model, width ratio, head ratio).

    Heads come in coarse steps, so the recipe's single ratio can undershoot the budget by a
    head's worth of parameters; the head ratio found first is therefore held while the width
    ratio is bisected again to fill the budget.
    """
    _, ratio = _bisect(dense, budget, None, steps)
    head_ratio = 0.0 if head_scoring_fails(dense.config) else allowed_head_ratio(dense.config, ratio)
    model, ratio = _bisect(dense, budget, head_ratio, steps)
    return model, ratio, head_ratio
