"""The one place that turns architectures into the predictor's named feature table.

Per layer i (L layers, G KV groups of g query heads, I FFN channels):

- ``attn_frac_i``    kept query heads / (G*g)           ``ffn_frac_i``    kept channels / I
- ``attn_mass_i``    kept head scores / all head scores ``ffn_mass_i``    kept channel scores / all channel scores
- ``attn_dropped_i`` 1 if the attention sublayer is gone ``ffn_dropped_i`` 1 if the MLP is gone
- ``block_params_i`` parameters of the block / those of the full block

With a sensitivity table (`pruning.sensitivity`), one more column leads the table:
``additive_cost``, the sum of the architecture's per-sublayer costs (the knapsack's objective),
so the model starts from the additive estimate and learns what it misses (see `predictor.base`).

and across depth: ``params_frac`` (whole model), ``attn_params_frac``, ``mlp_params_frac``,
``mass_total`` (sum of every kept score / sum of all scores, heads and channels pooled: the
zero-cost proxy), ``mass_mean`` (mean of the 2L per-sublayer masses), the mean and minimum of
the per-layer attention and FFN masses, the mean mass of the early and of the late half of the
layers (an odd middle layer is in both), and the counts of dropped sublayers.

"Mass kept" follows the units `Importance.kept_heads` / `kept_channels` keep, and is a table
lookup: the builder precomputes, per layer, the kept score of every (kv_heads, heads_per_group)
pair and the prefix sums of the channel scores sorted in descending order.

Every column moves in a known direction as a layer keeps more units (`direction`): masses,
fractions and parameter counts rise, dropped flags fall; the model turns this into monotone
constraints. The table carries its provenance in ``table.attrs[SIGNATURE_KEY]`` so a predictor
refuses tables of a different base model or feature version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pruning.architecture import Architecture, ModelSpec

if TYPE_CHECKING:
    from pruning.importance import Importance
    from pruning.sensitivity import SensitivityTable

FEATURE_VERSION = 1
SIGNATURE_KEY = "prunesearch.features"

GLOBAL_COLUMNS = (
    "params_frac", "attn_params_frac", "mlp_params_frac", "mass_total", "mass_mean",
    "attn_mass_mean", "ffn_mass_mean", "attn_mass_min", "ffn_mass_min", "mass_early", "mass_late",
    "attn_dropped_count", "ffn_dropped_count",
)
ADDITIVE = "additive_cost"
LAYER_KINDS = ("attn_frac", "ffn_frac", "attn_mass", "ffn_mass", "attn_dropped", "ffn_dropped", "block_params")


class FeatureError(ValueError):
    """Architectures or tables that do not belong to the builder's base model."""


def feature_columns(num_layers: int) -> list[str]:
    """Column order of every table for a `num_layers` model: globals, then each per-layer kind by depth."""
    return list(GLOBAL_COLUMNS) + [f"{kind}_{i}" for kind in LAYER_KINDS for i in range(num_layers)]


def direction(column: str) -> int:
    """Sign of d(metric)/d(column) when a layer keeps more units: -1 lowers (improves) perplexity, +1 raises it."""
    return 1 if "dropped" in column or column == ADDITIVE else -1


def spec_digest(spec: ModelSpec) -> str:
    return hashlib.sha256(repr(sorted(spec.to_dict().items())).encode()).hexdigest()[:16]


class FeatureBuilder:
    """`FeatureBuilder(importance).table(archs)` -> (N, len(feature_columns(L))) float DataFrame."""

    def __init__(self, importance: Importance, sensitivity: SensitivityTable | None = None):
        self.importance, self.sensitivity = importance, sensitivity
        self.spec = spec = importance.spec
        self.columns = ([ADDITIVE] if sensitivity else []) + feature_columns(spec.num_layers)
        self.signature = _signature(importance)
        # Kept score of each layer for every unit count; raw (unnormalised) so heads and channels can pool.
        # A layer whose scores are all zero counts its units as equal, so its mass is the kept fraction.
        self._head_kept = np.stack([_head_kept_table(_or_ones(h)) for h in importance.heads])  # (L, G+1, g+1)
        self._chan_kept = np.stack([_prefix_sums(_or_ones(c)) for c in importance.channels])  # (L, I+1)
        self._head_total = self._head_kept[:, -1, -1]  # (L,)
        self._chan_total = self._chan_kept[:, -1]  # (L,)
        kv, h = np.meshgrid(np.arange(spec.num_kv_heads + 1), np.arange(spec.group_size + 1), indexing="ij")
        self._attn_params = np.vectorize(spec.attention_params)(kv, h * (kv > 0))  # (G+1, g+1)
        self._mlp_params = np.array([spec.mlp_params(c) for c in range(spec.intermediate_size + 1)])  # (I+1,)

    def table(self, archs: Sequence[Architecture]) -> pd.DataFrame:
        kv, hpg, ch = self._shapes(archs)  # each (N, L) int
        layer = np.arange(self.spec.num_layers)  # (L,) broadcasts against (N, L)
        head_kept, chan_kept = self._head_kept[layer, kv, hpg], self._chan_kept[layer, ch]  # (N, L) raw scores
        attn_p, mlp_p = self._attn_params[kv, hpg], self._mlp_params[ch]  # (N, L) parameters
        full_attn, full_mlp = self._attn_params[-1, -1], self._mlp_params[-1]
        per_layer = {
            "attn_frac": kv * hpg / self.spec.num_heads,
            "ffn_frac": ch / self.spec.intermediate_size,
            "attn_mass": head_kept / self._head_total,
            "ffn_mass": chan_kept / self._chan_total,
            "attn_dropped": kv == 0,
            "ffn_dropped": ch == 0,
            "block_params": (attn_p + mlp_p) / (full_attn + full_mlp),
        }
        shared, n_layers = self.spec.shared_params(), self.spec.num_layers
        summary = self._summaries(per_layer["attn_mass"], per_layer["ffn_mass"]) | {
            "params_frac": (shared + attn_p.sum(1) + mlp_p.sum(1)) / (shared + n_layers * (full_attn + full_mlp)),
            "attn_params_frac": attn_p.sum(1) / (n_layers * full_attn),
            "mlp_params_frac": mlp_p.sum(1) / (n_layers * full_mlp),
            "mass_total": (head_kept.sum(1) + chan_kept.sum(1)) / (self._head_total.sum() + self._chan_total.sum()),
            "attn_dropped_count": (kv == 0).sum(1),
            "ffn_dropped_count": (ch == 0).sum(1),
        }
        if self.sensitivity is not None:
            summary[ADDITIVE] = self.sensitivity.additive(archs)
        data = np.column_stack(
            [summary[c] for c in self.columns[: -len(LAYER_KINDS) * n_layers]] + [per_layer[k] for k in LAYER_KINDS]
        ).astype(np.float64)  # (N, F)
        out = pd.DataFrame(data, columns=self.columns)
        out.attrs[SIGNATURE_KEY] = self.signature
        return out

    @staticmethod
    def _summaries(attn_mass: np.ndarray, ffn_mass: np.ndarray) -> dict[str, np.ndarray]:
        """Statistics over depth of the (N, L) per-layer masses; each (N,)."""
        n_layers = attn_mass.shape[1]
        early, late = slice(0, (n_layers + 1) // 2), slice(n_layers // 2, None)  # halves; odd L shares the middle
        return {
            "mass_mean": (attn_mass.mean(1) + ffn_mass.mean(1)) / 2,
            "attn_mass_mean": attn_mass.mean(1),
            "ffn_mass_mean": ffn_mass.mean(1),
            "attn_mass_min": attn_mass.min(1),
            "ffn_mass_min": ffn_mass.min(1),
            "mass_early": (attn_mass[:, early].mean(1) + ffn_mass[:, early].mean(1)) / 2,
            "mass_late": (attn_mass[:, late].mean(1) + ffn_mass[:, late].mean(1)) / 2,
        }

    def _shapes(self, archs: Sequence[Architecture]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        for a in archs:
            if a.spec != self.spec:
                raise FeatureError(
                    f"architecture is for {a.spec.base_model} but the importance scores are for "
                    f"{self.spec.base_model}; build the FeatureBuilder from that model's importance"
                )
        raw = np.array(
            [[(x.kv_heads, x.heads_per_group, x.ffn_channels) for x in a.layers] for a in archs], dtype=np.int64
        ).reshape(len(archs), self.spec.num_layers, 3)  # (N, L, 3)
        return raw[..., 0], raw[..., 1], raw[..., 2]


def _prefix_sums(scores: np.ndarray) -> np.ndarray:
    """(n+1,) sum of the k largest scores for k = 0..n."""
    return np.concatenate([[0.0], np.cumsum(np.sort(scores.astype(np.float64))[::-1])])


def _head_kept_table(scores: np.ndarray) -> np.ndarray:
    """(G+1, g+1) kept score for kv groups x h heads per group, as `Importance.kept_heads` chooses them.

    Each group keeps its top h heads; the kv groups whose kept heads score highest stay.
    """
    per_group = np.stack([_prefix_sums(row) for row in scores])  # (G, g+1): group's top-h sum
    ranked = np.sort(per_group, axis=0)[::-1]  # best groups first, per h
    return np.concatenate([np.zeros((1, per_group.shape[1])), np.cumsum(ranked, axis=0)])


def _or_ones(scores: np.ndarray) -> np.ndarray:
    return scores if scores.sum() > 0 else np.ones_like(scores)


def _signature(importance: Importance) -> dict[str, Any]:
    return {
        "feature_version": FEATURE_VERSION,
        "base_model": importance.spec.base_model,
        "spec_digest": spec_digest(importance.spec),
        "importance_method": importance.method,
        "importance_digest": importance.digest(),
    }
