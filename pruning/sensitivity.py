"""The per-sublayer sensitivity database: each sublayer alone at a few kept sizes, the rest of the model full.

For sublayer s (the attention or the MLP of layer i) kept at size o, the model is masked so
that only s changes, and the rise of a loss over the dense model on a few windows is the cost
of that choice:

    cost[s, o] = mean_w [ loss_w(model with s at o) - loss_w(dense) ]
    loss: "nll"  mean next-token NLL (the rise is the rise of log-perplexity)
          "kl"   mean KL(dense || pruned) of the next-token distributions (the dense model's is 0)

Sizes are measured on a grid (`Grid`: every attention level when a layer has at most `points`
of them, else `points` spread evenly in kept parameters; FFN widths k/points of the full
width) and linearly interpolated in kept parameters in between, then made monotone: keeping
fewer units never costs less than keeping more, and nothing costs less than keeping all.
The additive estimate of an architecture, sum_s cost[s, size_s], is the "level database" of
OWL-style allocation, ZipLM and EvoPress/DarwinLM; `search.knapsack` minimises it under a budget.

Measurements are cached per option in `<cache_dir>/sensitivity-<key>.json` as they finish, so an
interrupted pass resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning.architecture import Architecture, LayerShape, ModelSpec
from pruning.importance import Importance, cache_key
from pruning.masking import masked
from pruning.metrics import next_token_logprobs, window_losses

LOSSES = ("nll", "kl")
CACHE_VERSION = 1


@dataclass(frozen=True)
class Grid:
    """Kept sizes measured per sublayer, ascending in parameters; both end with the full size."""

    attention: tuple[tuple[int, int], ...]  # (kv_heads, heads_per_group); (0, 0) = dropped
    ffn: tuple[int, ...]  # kept channels; 0 = dropped

    @classmethod
    def spread(cls, spec: ModelSpec, points: int = 8) -> Grid:
        if points < 2:
            raise ValueError(f"a sensitivity grid needs at least 2 points per sublayer, got {points}")
        levels = sorted(((kv, h) for kv in range(1, spec.num_kv_heads + 1) for h in range(1, spec.group_size + 1)),
                        key=lambda p: (spec.attention_params(*p), p))
        if len(levels) > points:  # the level nearest each k/points of the full attention's parameters
            cost = np.array([spec.attention_params(*p) for p in levels])
            picks = {int(np.abs(cost - cost[-1] * k / points).argmin()) for k in range(1, points)}
            levels = [levels[i] for i in sorted(picks | {len(levels) - 1})]
        width = spec.intermediate_size
        ffn = sorted({round(width * k / points) for k in range(points)} | {width})
        return cls(((0, 0), *levels), tuple(ffn))

    def windows_evaluated(self, spec: ModelSpec, windows: int) -> int:
        """Evaluation windows a table on `windows` windows costs: every option, plus the dense pass."""
        return (len(self.options(spec)) + 1) * windows

    def options(self, spec: ModelSpec) -> list[tuple[str, int, LayerShape]]:
        """(kind, layer, the layer's shape) of every measurement: each sublayer at each size but full."""
        full = Architecture.full(spec).layers[0]
        out = []
        for i in range(spec.num_layers):
            out += [("attention", i, replace(full, kv_heads=kv, heads_per_group=h)) for kv, h in self.attention[:-1]]
            out += [("ffn", i, replace(full, ffn_channels=c)) for c in self.ffn[:-1]]
        return out


@dataclass(frozen=True)
class SensitivityTable:
    """Per-window rises of each loss: attention[loss] (L, A, N) over grid.attention, ffn[loss] (L, F, N)."""

    spec: ModelSpec
    grid: Grid
    attention: dict[str, np.ndarray]
    ffn: dict[str, np.ndarray]
    loss: str = "nll"  # which loss the costs read

    def __post_init__(self) -> None:
        if self.loss not in self.attention:
            raise ValueError(f"the table holds {sorted(self.attention)}, not {self.loss!r}; measure it with that loss")

    @property
    def windows(self) -> int:
        return self.attention[self.loss].shape[-1]

    def measurements(self) -> int:
        return len(self.grid.options(self.spec))

    def windows_evaluated(self) -> int:
        return self.grid.windows_evaluated(self.spec, self.windows)

    def using(self, loss: str | None = None, windows: int | None = None) -> SensitivityTable:
        """The same table reading `loss`, on its first `windows` windows."""
        cut = slice(None, windows)
        return SensitivityTable(self.spec, self.grid, {k: v[..., cut] for k, v in self.attention.items()},
                                {k: v[..., cut] for k, v in self.ffn.items()}, loss or self.loss)

    def _curve(self, kind: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(kept parameters (P,), monotone cost (P,)) of one sublayer's grid, ascending in parameters."""
        s = self.spec
        if kind == "attention":
            x, rise = [s.attention_params(*p) for p in self.grid.attention], self.attention[self.loss][layer]
        else:
            x, rise = [s.mlp_params(c) for c in self.grid.ffn], self.ffn[self.loss][layer]
        cost = np.append(rise.mean(-1), 0.0)  # the full size costs nothing
        return np.array(x, dtype=float), np.maximum.accumulate(cost[::-1])[::-1]

    @cached_property
    def _curves(self) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
        return {kind: [self._curve(kind, i) for i in range(self.spec.num_layers)] for kind in ("attention", "ffn")}

    def attention_cost(self, layer: int, kv_heads: int, heads_per_group: int) -> float:
        x, cost = self._curves["attention"][layer]
        return float(np.interp(self.spec.attention_params(kv_heads, heads_per_group), x, cost))

    def ffn_cost(self, layer: int, channels: int) -> float:
        x, cost = self._curves["ffn"][layer]
        return float(np.interp(self.spec.mlp_params(channels), x, cost))

    def additive(self, archs: list[Architecture]) -> np.ndarray:
        """(N,) sum over sublayers of their cost: the estimated rise of the loss for each architecture."""
        s = self.spec
        if not archs:
            return np.zeros(0)
        attn = np.array([[s.attention_params(x.kv_heads, x.heads_per_group) for x in a.layers] for a in archs])
        mlp = np.array([[s.mlp_params(x.ffn_channels) for x in a.layers] for a in archs])
        total = np.zeros(len(archs))
        for i in range(s.num_layers):  # each (N,): interpolate every architecture's layer i at once
            total += np.interp(attn[:, i], *self._curves["attention"][i])
            total += np.interp(mlp[:, i], *self._curves["ffn"][i])
        return total


def measure_sensitivity(
    model: PreTrainedModel,
    importance: Importance,
    windows: torch.Tensor,
    grid: Grid,
    losses: tuple[str, ...] = ("nll",),
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
) -> SensitivityTable:
    """Measure every option of `grid` on `windows` (N, T); costs N windows per option, plus the dense pass."""
    unknown = set(losses) - set(LOSSES)
    if unknown or not losses:
        raise ValueError(f"losses must be some of {LOSSES}, got {losses}")
    spec = importance.spec
    path = _cache_path(model, importance, windows, grid, losses, cache_dir)
    done = json.loads(path.read_text()) if path is not None and path.exists() else {}
    reference = next_token_logprobs(model, windows, batch_size) if "kl" in losses else None
    dense = window_losses(model, windows, batch_size, reference)
    full = Architecture.full(spec)
    options = grid.options(spec)
    for kind, layer, shape in tqdm(options, desc="sensitivity", unit="option", leave=False):
        key = _option_key(kind, layer, shape)
        if key in done:
            continue
        arch = Architecture(spec, full.layers[:layer] + (shape,) + full.layers[layer + 1:])
        with masked(model, arch, importance):
            got = window_losses(model, windows, batch_size, reference)
        done[key] = {loss: (got[loss] - (dense[loss] if loss == "nll" else 0.0)).tolist() for loss in losses}
        if path is not None:
            _write_atomic(path, json.dumps(done))
    return _table(spec, grid, losses, done)


def _table(spec: ModelSpec, grid: Grid, losses: tuple[str, ...], done: dict) -> SensitivityTable:
    attention, ffn = {}, {}
    for loss in losses:
        attention[loss] = np.array([[done[_option_key("attention", i, LayerShape(kv, h, spec.intermediate_size))][loss]
                                     for kv, h in grid.attention[:-1]] for i in range(spec.num_layers)])
        ffn[loss] = np.array([[done[_option_key("ffn", i, LayerShape(spec.num_kv_heads, spec.group_size, c))][loss]
                               for c in grid.ffn[:-1]] for i in range(spec.num_layers)])
    return SensitivityTable(spec, grid, attention, ffn, losses[0])


def _option_key(kind: str, layer: int, shape: LayerShape) -> str:
    size = f"{shape.kv_heads}x{shape.heads_per_group}" if kind == "attention" else str(shape.ffn_channels)
    return f"{kind}:{layer}:{size}"


def _cache_path(model, importance, windows, grid, losses, cache_dir) -> Path | None:
    if cache_dir is None:
        return None
    h = hashlib.sha256(json.dumps([CACHE_VERSION, grid.attention, grid.ffn, sorted(losses)]).encode())
    h.update((cache_key(model, windows, importance.method) + importance.digest()).encode())
    return Path(cache_dir) / f"sensitivity-{h.hexdigest()[:20]}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
