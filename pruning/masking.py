"""Evaluate a candidate architecture on the live model without copying or touching its weights.

A pruned head or FFN channel contributes to the residual stream only through its
column of o_proj / down_proj, so zeroing the matching *input* channels of those
two projections computes exactly what the sliced model computes:

    o_proj(x * m) = W[:, m == 1] @ x[m == 1]        m: (C,) 0/1 mask

Masks are applied by forward pre-hooks, so the weights are never written and
removing the hooks restores the model bit for bit. Under no_grad/inference the
mask multiplies the (freshly computed, unshared) projection input in place, so
evaluation allocates nothing but the masks (see experiments/bench_engine.py for
the time and memory ratios).

Masking computes at the dense model's cost. `as_candidate` is what measuring code uses: where the kept
weights of the pruned layers fit twice over in free memory it measures `slicing.sliced_view` instead
(the same function to float rounding, at the smaller model's cost), else the masked model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from pruning import adapter
from pruning.architecture import Architecture
from pruning.importance import Importance
from pruning.slicing import check_architecture, sliced_view


def unit_masks(arch: Architecture, importance: Importance, layer: int,
               dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """(o_mask (num_heads*head_dim,), down_mask (intermediate,)) for one layer; None where all is kept."""
    spec, shape = arch.spec, arch.layers[layer]
    o_mask = down_mask = None
    if (shape.kv_heads, shape.heads_per_group) != (spec.num_kv_heads, spec.group_size):
        heads = torch.zeros(spec.num_heads, dtype=dtype, device=device)
        heads[torch.as_tensor(importance.kept_heads(layer, shape).ravel(), dtype=torch.long)] = 1
        o_mask = heads.repeat_interleave(spec.head_dim)
    if shape.ffn_channels != spec.intermediate_size:
        down_mask = torch.zeros(spec.intermediate_size, dtype=dtype, device=device)
        down_mask[torch.as_tensor(importance.kept_channels(layer, shape), dtype=torch.long)] = 1
    return o_mask, down_mask


def _mask_hook(mask: torch.Tensor):
    def hook(module, args):
        x = args[0]
        if torch.is_grad_enabled():
            return (x * mask,) + tuple(args[1:])
        x.mul_(mask)  # the input is a fresh activation no one else reads
        return None

    return hook


@contextmanager
def masked(model: PreTrainedModel, arch: Architecture, importance: Importance) -> Iterator[PreTrainedModel]:
    """Within the block, `model` computes what `arch` sliced from it would compute."""
    check_architecture(model, arch)
    param = next(model.parameters())
    handles = []
    try:
        for i, layer in enumerate(adapter.decoder_layers(model)):
            parts = adapter.layer_parts(layer)
            for proj, mask in zip((parts.o, parts.down), unit_masks(arch, importance, i, param.dtype, param.device),
                                  strict=True):
                if mask is not None:
                    handles.append(proj.register_forward_pre_hook(_mask_hook(mask)))
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def as_candidate(model: PreTrainedModel, arch: Architecture, importance: Importance) -> Iterator[PreTrainedModel]:
    """Within the block, `model` computes what `arch` sliced from it computes: a sliced view when its copies
    fit (module docstring), else masks. On exit the model is as it was."""
    param = next(model.parameters())
    view = sliced_view if 2 * view_bytes(arch, param.element_size()) <= free_bytes(param.device) else masked
    with view(model, arch, importance):
        yield model


def view_bytes(arch: Architecture, element_size: int) -> int:
    """Bytes `sliced_view` copies: the kept weights of every layer `arch` prunes."""
    s, full = arch.spec, Architecture.full(arch.spec).layers
    kept = sum(s.attention_params(x.kv_heads, x.heads_per_group) + s.mlp_params(x.ffn_channels)
               for x, dense in zip(arch.layers, full, strict=True) if x != dense)
    return kept * element_size


def free_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's free bytes, or the host's available RAM (0 where /proc/meminfo is not)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
    except OSError:
        return 0
    return int(info["MemAvailable"].split()[0]) * 1024
