"""Per-unit importance scores from calibration windows, and which units an architecture keeps.

A unit's score is computed at the input of the projection that writes it back
into the residual stream (o_proj for heads, down_proj for FFN channels), from
running per-channel statistics gathered by forward hooks in one pass (nothing
stored but three vectors per projection):

- "wanda":       s_c = ||W[:, c]||_2 * ||x_c||_2                 (Wanda: weight x activation norm)
- "fluctuation": s_c = ||W[:, c]||_2^2 * Var(x_c)                (FLAP: what a bias cannot compensate)
- "taylor":      s_c = sum_batches |sum_tokens x_c * dL/dx_c|    (first-order loss change; needs backward)

Head scores sum their head_dim channels. Every ranking is a stable sort, so the
kept units of an `Architecture` follow deterministically from the scores.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning import adapter
from pruning.architecture import LayerShape, ModelSpec
from pruning.files import replacing

METHODS = ("wanda", "fluctuation", "taylor")
CACHE_VERSION = 1


@dataclass(frozen=True)
class Importance:
    """heads[i]: (num_kv_heads, group_size) scores of layer i; channels[i]: (intermediate_size,)."""

    spec: ModelSpec
    method: str
    heads: tuple[np.ndarray, ...]
    channels: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        s = self.spec
        if len(self.heads) != s.num_layers or len(self.channels) != s.num_layers:
            raise ValueError(f"importance has scores for {len(self.heads)} layers, {s.base_model} has {s.num_layers}")
        for i, (h, c) in enumerate(zip(self.heads, self.channels, strict=True)):
            if h.shape != (s.num_kv_heads, s.group_size) or c.shape != (s.intermediate_size,):
                raise ValueError(f"layer {i}: score shapes {h.shape}, {c.shape} do not match {s.base_model}")

    def kept_heads(self, layer: int, shape: LayerShape) -> np.ndarray:
        """(kv_heads, heads_per_group) array of kept query-head indices within their group; rows = kept groups.

        Each group keeps its top heads; groups rank by the score of what they would keep.
        Returns global head indices (group * group_size + head), groups and heads ascending.
        """
        scores = self.heads[layer]
        top = np.sort(_top(scores, shape.heads_per_group, axis=1), axis=1)  # (G, h)
        group_score = np.take_along_axis(scores, top, axis=1).sum(axis=1)
        groups = np.sort(_top(group_score, shape.kv_heads))
        return groups[:, None] * self.spec.group_size + top[groups]

    def kept_channels(self, layer: int, shape: LayerShape) -> np.ndarray:
        return np.sort(_top(self.channels[layer], shape.ffn_channels))

    def digest(self) -> str:
        """16 hex digits identifying the scores (which units every architecture keeps)."""
        h = hashlib.sha256()
        for a in self.heads + self.channels:
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"heads.{i}": h for i, h in enumerate(self.heads)}
        out.update({f"channels.{i}": c for i, c in enumerate(self.channels)})
        return out


def _top(scores: np.ndarray, k: int, axis: int = -1) -> np.ndarray:
    """Indices of the k largest scores along `axis`, ties broken by lower index."""
    order = np.argsort(-scores, axis=axis, kind="stable")
    return np.take(order, np.arange(k), axis=axis)


class _ChannelStats:
    """Running sum, sum of squares and (for Taylor) |sum x*g| of one projection's input channels."""

    def __init__(self, width: int, device: torch.device):
        self.count = 0
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros_like(self.sum)
        self.taylor = torch.zeros_like(self.sum)

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()  # (B*T, C)
        self.count += flat.shape[0]
        self.sum += flat.sum(0)
        self.sumsq += flat.square().sum(0)

    def observe_grad(self, x: torch.Tensor, grad: torch.Tensor) -> None:
        xg = (x.detach().double() * grad.double()).reshape(-1, x.shape[-1]).sum(0)
        self.taylor += xg.abs()

    def scores(self, method: str, weight: torch.Tensor) -> np.ndarray:
        col_norm_sq = weight.detach().double().square().sum(0)  # (C,) ||W[:, c]||^2
        if method == "wanda":
            s = col_norm_sq.sqrt() * self.sumsq.sqrt()
        elif method == "fluctuation":
            mean = self.sum / self.count
            s = col_norm_sq * (self.sumsq / self.count - mean.square()).clamp_min(0)
        else:
            s = self.taylor
        return s.cpu().numpy()


def compute_importance(
    model: PreTrainedModel, windows: torch.Tensor, method: str = "wanda", batch_size: int = 8
) -> Importance:
    """One pass over `windows` (N, T) with hooks; a backward pass per batch only for "taylor"."""
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; choose one of {', '.join(METHODS)}")
    spec = adapter.model_spec(model)
    device = next(model.parameters()).device
    parts = [adapter.layer_parts(layer) for layer in adapter.decoder_layers(model)]
    stats = {}
    handles = []
    for i, p in enumerate(parts):
        for key, proj in (("o", p.o), ("down", p.down)):
            stats[i, key] = _ChannelStats(proj.in_features, device)
            handles.append(proj.register_forward_pre_hook(_recorder(stats[i, key], method == "taylor")))
    if method == "taylor":
        # Gradients w.r.t. activations only: make the embeddings' output the graph's leaf.
        embed = model.get_input_embeddings()
        handles.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_()))
    try:
        _run_batches(model, windows, batch_size, backward=method == "taylor")
    finally:
        for h in handles:
            h.remove()
    heads = tuple(
        stats[i, "o"].scores(method, p.o.weight).reshape(spec.num_kv_heads, spec.group_size, spec.head_dim).sum(-1)
        for i, p in enumerate(parts)
    )
    channels = tuple(stats[i, "down"].scores(method, p.down.weight) for i, p in enumerate(parts))
    return Importance(spec, method, heads, channels)


def _recorder(stats: _ChannelStats, with_grad: bool):
    def hook(module, args):
        x = args[0]
        stats.observe(x)
        if with_grad and x.requires_grad:
            x.register_hook(lambda g: stats.observe_grad(x, g))

    return hook


def _run_batches(model: PreTrainedModel, windows: torch.Tensor, batch_size: int, backward: bool) -> None:
    device = next(model.parameters()).device
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="importance", leave=False):
            batch = windows[start : start + batch_size].to(device)
            with torch.set_grad_enabled(backward):
                out = model(input_ids=batch, labels=batch if backward else None)
                if backward:
                    out.loss.backward()
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)


def cache_key(model: PreTrainedModel, windows: torch.Tensor, method: str, batch_size: int = 8) -> str:
    """Hash of the model (config + a per-tensor weight checksum), the calibration tokens and the method, and
    for taylor the batch size (it sums |x·g| per batch; the other methods' running statistics do not depend on it)."""
    h = hashlib.sha256()
    parts = [CACHE_VERSION, method, model.config.to_dict(), *([batch_size] if method == "taylor" else [])]
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.double().sum().item():.10e}".encode())
    h.update(windows.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def load_or_compute(
    model: PreTrainedModel, windows: torch.Tensor, method: str, cache_dir: Path, batch_size: int = 8
) -> Importance:
    """Scores from `cache_dir/importance-<key>.safetensors`, computing and caching them when absent."""
    path = Path(cache_dir) / f"importance-{method}-{cache_key(model, windows, method, batch_size)}.safetensors"
    spec = adapter.model_spec(model)
    if path.exists():
        arrays = load_file(str(path))
        n = spec.num_layers
        return Importance(spec, method, tuple(arrays[f"heads.{i}"] for i in range(n)),
                          tuple(arrays[f"channels.{i}"] for i in range(n)))
    importance = compute_importance(model, windows, method, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        save_file(importance.to_arrays(), str(tmp), metadata={"method": method, "base_model": spec.base_model})
    return importance
