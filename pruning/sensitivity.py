"""The per-sublayer sensitivity database: each sublayer alone at a few kept sizes, the rest of the model at a base.

For sublayer s (the attention or the MLP of layer i) kept at size o, the model is masked so
that only s differs from the base architecture (by default the dense model), and the rise of a
loss over the base on a few windows is the cost of that choice:

    cost[s, o] = mean_w [ loss_w(base with s at o) - loss_w(base) ]
    loss: "nll"  mean next-token NLL (the rise is the rise of log-perplexity)
          "kl"   mean KL(dense || pruned) of the next-token distributions (the dense model's is 0)

A table around a pruned base (the knapsack of the dense table, say) measures each sublayer in
the context the search actually works in: how much an FFN costs to cut when its neighbours are
already cut, and how much one gains when it is given back (a negative cost). With `reach` it
measures only the `reach` grid sizes nearest the base's on each side of it, where a search around
the base moves, and reads sizes farther out off another table (the dense one): that table's
curve continued from the farthest size measured, which costs a fraction of a full table on deep
models.

Sizes are measured on a grid (`Grid`: every attention level when a layer has at most `points`
of them, else `points` spread evenly in kept parameters; FFN widths k/points of the full
width) and linearly interpolated in kept parameters in between, then made monotone: keeping
fewer units never costs less than keeping more; the base's own size reads 0 before that.
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

from pruning import adapter
from pruning.architecture import Architecture, LayerShape, ModelSpec
from pruning.files import write_atomic
from pruning.importance import Importance, cache_key
from pruning.layerwise import Batch, layer_inputs, logits_from, run_layer
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

    def windows_evaluated(self, spec: ModelSpec, windows: int, base: Architecture | None = None,
                          reach: int | None = None) -> int:
        """Evaluation windows a table on `windows` windows costs: every option, plus the base's pass."""
        return (len(self.options(spec, base, reach)) + 1) * windows

    def shapes(self, kind: str, here: LayerShape) -> list[LayerShape]:
        """The layer `here` with one sublayer (`kind`) at each grid size, ascending."""
        if kind == "attention":
            return [replace(here, kv_heads=kv, heads_per_group=h) for kv, h in self.attention]
        return [replace(here, ffn_channels=c) for c in self.ffn]

    def sizes(self, spec: ModelSpec, kind: str, here: LayerShape) -> tuple[np.ndarray, float]:
        """(parameters the sublayer keeps at each grid size (P,), at `here`'s own size)."""
        return sublayer_params(spec, kind, self.shapes(kind, here)), float(sublayer_params(spec, kind, [here])[0])

    def options(self, spec: ModelSpec, base: Architecture | None = None,
                reach: int | None = None) -> list[tuple[str, int, LayerShape]]:
        """(kind, layer, the layer's shape) of every measurement: each sublayer at each grid size but the base's,
        or with `reach` only the `reach` nearest below and above the base's (and any of its parameter count)."""
        base = base or Architecture.full(spec)
        out = []
        for i, here in enumerate(base.layers):
            for kind in ("attention", "ffn"):
                x, own = self.sizes(spec, kind, here)
                near = set(range(len(x))) if reach is None else _near(x, own, reach)
                out += [(kind, i, s) for j, s in enumerate(self.shapes(kind, here)) if j in near and s != here]
        return out


def sublayer_params(spec: ModelSpec, kind: str, shapes: list[LayerShape]) -> np.ndarray:
    """(len(shapes),) parameters one sublayer (`kind`) keeps in each layer shape."""
    if kind == "attention":
        return np.array([spec.attention_params(s.kv_heads, s.heads_per_group) for s in shapes], dtype=float)
    return np.array([spec.mlp_params(s.ffn_channels) for s in shapes], dtype=float)


def _near(x: np.ndarray, own: float, reach: int) -> set[int]:
    """Indices of ascending sizes `x` within `reach` places of `own` on either side, and those equal to it."""
    below, above = np.flatnonzero(x < own), np.flatnonzero(x > own)
    return {*below[max(0, len(below) - reach):].tolist(), *above[:reach].tolist(), *np.flatnonzero(x == own).tolist()}


@dataclass(frozen=True)
class SensitivityTable:
    """Per-window rises of each loss over the base: attention[loss] (L, A, N) over grid.attention, ffn[loss]
    (L, F, N) over grid.ffn; a size that is the base's own reads 0."""

    spec: ModelSpec
    grid: Grid
    attention: dict[str, np.ndarray]
    ffn: dict[str, np.ndarray]
    loss: str = "nll"  # which loss the costs read
    base: Architecture | None = None  # what the other sublayers keep while one is measured; None: the dense model
    reach: int | None = None  # grid sizes measured on each side of the base's; None: all (see `measure_sensitivity`)

    def __post_init__(self) -> None:
        if self.loss not in self.attention:
            raise ValueError(f"the table holds {sorted(self.attention)}, not {self.loss!r}; measure it with that loss")
        n = self.spec.num_layers
        for kind, arrays, sizes in (("attention", self.attention, self.grid.attention),
                                    ("ffn", self.ffn, self.grid.ffn)):
            for loss, a in arrays.items():
                if a.shape[:2] != (n, len(sizes)):
                    raise ValueError(f"{kind}[{loss!r}] has shape {a.shape}; expected ({n}, {len(sizes)}, windows)")

    @property
    def base_architecture(self) -> Architecture:
        return self.base or Architecture.full(self.spec)

    @property
    def windows(self) -> int:
        return self.attention[self.loss].shape[-1]

    def measurements(self) -> int:
        return len(self.grid.options(self.spec, self.base, self.reach))

    def windows_evaluated(self) -> int:
        return self.grid.windows_evaluated(self.spec, self.windows, self.base, self.reach)

    def using(self, loss: str | None = None, windows: int | None = None) -> SensitivityTable:
        """The same table reading `loss`, on its first `windows` windows."""
        cut = slice(None, windows)
        return SensitivityTable(self.spec, self.grid, {k: v[..., cut] for k, v in self.attention.items()},
                                {k: v[..., cut] for k, v in self.ffn.items()}, loss or self.loss, self.base,
                                self.reach)

    def _curve(self, kind: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(kept parameters (P,), monotone cost (P,)) of one sublayer's grid and the base's size, ascending."""
        here = self.base_architecture.layers[layer]
        x, own = self.grid.sizes(self.spec, kind, here)
        cost = getattr(self, kind)[self.loss][layer].mean(-1)
        if own not in x:  # the base's size between grid points costs nothing by definition
            at = int(np.searchsorted(x, own))
            x, cost = np.insert(x, at, own), np.insert(cost, at, 0.0)
        return x, np.maximum.accumulate(cost[::-1])[::-1]

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


@torch.inference_mode()
def measure_sensitivity(
    model: PreTrainedModel,
    importance: Importance,
    windows: torch.Tensor,
    grid: Grid,
    losses: tuple[str, ...] = ("nll",),
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    base: Architecture | None = None,
    reach: int | None = None,
    far: SensitivityTable | None = None,
) -> SensitivityTable:
    """Measure every option of `grid` around `base` (default: the dense model) on `windows` (N, T); costs N
    windows per option, plus the base's pass.

    `reach`: measure only the `reach` grid sizes nearest the base's on each side; a size farther out reads the
    rise of the farthest one measured on its side plus `far`'s difference between the two (`far`: a table on the
    same grid and windows, the dense one, say), so the local curve near the base continues with far's shape."""
    unknown = set(losses) - set(LOSSES)
    if unknown or not losses:
        raise ValueError(f"losses must be some of {LOSSES}, got {losses}")
    if reach is not None and (reach < 1 or far is None):
        raise ValueError(f"a table with reach needs reach >= 1 and a far table to continue; got reach={reach}")
    if far is not None and (far.grid != grid or far.windows != len(windows) or set(losses) - set(far.attention)):
        raise ValueError("the far table must be measured on the same grid, number of windows and losses")
    spec = importance.spec
    path = _cache_path(model, importance, windows, grid, losses, cache_dir, base, reach)
    done = json.loads(path.read_text()) if path is not None and path.exists() else {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    reference = next_token_logprobs(model, windows, batch_size) if "kl" in losses else None
    if base is None:
        before = window_losses(model, windows, batch_size, reference)
        before["kl"] = np.zeros(len(windows))  # the dense model's KL to itself
    else:
        with masked(model, base, importance):
            before = window_losses(model, windows, batch_size, reference)
    around = base or Architecture.full(spec)
    stream = _BaseStream(model, around, importance, windows, batch_size)
    for kind, layer, shape in tqdm(grid.options(spec, base, reach), desc="sensitivity", unit="option", leave=False):
        key = _option_key(kind, layer, shape)
        if key in done:
            continue
        batches = stream.entering(layer)
        arch = Architecture(spec, around.layers[:layer] + (shape,) + around.layers[layer + 1:])
        with masked(model, arch, importance):
            got = window_losses(model, windows, batch_size, reference,
                                lambda k, _, i=layer, b=batches: logits_from(model, i, b[k]))
        done[key] = {loss: (got[loss] - before[loss]).tolist() for loss in losses}
        if path is not None:
            write_atomic(path, json.dumps(done))
    return _table(spec, grid, losses, done, base, len(windows), reach, far)


class _BaseStream:
    """The base architecture's hidden states entering each layer in turn, so an option of layer i runs layers i..L-1
    only: the layers before it compute the same for every option of layer i (half the decoder's work, on average,
    exactly). Holds one (N, T, hidden) stream at a time; layers are visited in ascending order."""

    def __init__(self, model: PreTrainedModel, base: Architecture, importance: Importance, windows: torch.Tensor,
                 batch_size: int):
        self.model, self.base, self.importance = model, base, importance
        self.batches, self.layer = layer_inputs(model, windows, batch_size), 0

    def entering(self, layer: int) -> list[Batch]:
        if layer < self.layer:
            raise ValueError(f"the stream has passed layer {layer} (it is at {self.layer})")
        layers = adapter.decoder_layers(self.model)
        with masked(self.model, self.base, self.importance):
            for i in range(self.layer, layer):
                self.batches = [Batch(run_layer(layers[i], b.hidden, b.kwargs), b.kwargs) for b in self.batches]
        self.layer = layer
        return self.batches


def _table(spec: ModelSpec, grid: Grid, losses: tuple[str, ...], done: dict, base: Architecture | None,
           n_windows: int, reach: int | None, far: SensitivityTable | None) -> SensitivityTable:
    """Arrays over the whole grid from the measured options; the base's own sizes read 0, sizes beyond reach
    continue from the farthest measured one along `far`."""
    around = base or Architecture.full(spec)

    def row(kind: str, layer: int, loss: str) -> np.ndarray:  # (P, N) one sublayer's rises over the grid
        here, shapes = around.layers[layer], grid.shapes(kind, around.layers[layer])
        measured = {j: done[key][loss] for j, s in enumerate(shapes)
                    if s != here and (key := _option_key(kind, layer, s)) in done}
        out = np.array([np.zeros(n_windows) if s == here else measured.get(j, np.full(n_windows, np.nan))
                        for j, s in enumerate(shapes)])
        if np.isnan(out).any():  # beyond reach
            x, own = grid.sizes(spec, kind, here)
            curve = getattr(far, kind)[loss][layer]
            for j in np.flatnonzero(np.isnan(out[:, 0])):
                side = [k for k in measured if (x[k] < own) == (x[j] < own)]
                edge = min(side) if x[j] < own else max(side)
                out[j] = out[edge] + curve[j] - curve[edge]
        return out

    arrays = {kind: {loss: np.array([row(kind, i, loss) for i in range(spec.num_layers)]) for loss in losses}
              for kind in ("attention", "ffn")}
    return SensitivityTable(spec, grid, arrays["attention"], arrays["ffn"], losses[0], base, reach)


def _option_key(kind: str, layer: int, shape: LayerShape) -> str:
    size = f"{shape.kv_heads}x{shape.heads_per_group}" if kind == "attention" else str(shape.ffn_channels)
    return f"{kind}:{layer}:{size}"


def _cache_path(model, importance, windows, grid, losses, cache_dir, base, reach) -> Path | None:
    if cache_dir is None:
        return None
    # dense and full tables keep the keys they always had
    around = ([] if base is None else [base.to_json()]) + ([] if reach is None else [reach])
    h = hashlib.sha256(json.dumps([CACHE_VERSION, grid.attention, grid.ffn, sorted(losses), *around]).encode())
    h.update((cache_key(model, windows, importance.method) + importance.digest()).encode())
    return Path(cache_dir) / f"sensitivity-{h.hexdigest()[:20]}.json"
