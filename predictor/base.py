"""What every objective predictor does around its regressor: clean the pairs, check the table, fit on log(metric).

A subclass implements two methods on plain arrays and the base class does the rest:

    _fit(x, y)              x: (n, F) features in `columns_` order, y: (n,) log metric
    _predict_members(x)     -> (M, n) log-metric predictions of its M members (M = 1 for a point model)

Predictions come back on the metric's own scale (perplexity: lower is better):

    mean   = exp(mean_m pred_m)      geometric mean of the members (the mean on the log scale)
    spread = std_m exp(pred_m)       disagreement of the members, in metric units

Additive prior. When the table has the ``additive_cost`` column (the sensitivity database's
estimate, `predictor.features`), a least-squares line  log(metric) ~ a + b * additive_cost  with
b >= 0 is fitted first and the members learn only the residual, the non-additive part (EvoPress
shows pruning errors are not additive). The line is added back to every member's prediction, so
with few pairs the predictor falls back on the database's ranking rather than on a constant.

Failed candidates (NaN or infinite metrics) are skipped with a logged warning; fewer than `min_pairs`
finite pairs, non-positive metrics, or a table of another base model / feature version raise
`PredictorError`.
"""

from __future__ import annotations

import abc
import logging
from typing import Any

import numpy as np
import pandas as pd

from predictor.features import ADDITIVE, SIGNATURE_KEY

logger = logging.getLogger(__name__)

MIN_PAIRS = 5
# Signature fields that change what a feature means; the importance digest only warns (recomputed scores drift).
STRICT_FIELDS = ("feature_version", "base_model", "spec_digest", "importance_method")


class PredictorError(ValueError):
    """Pairs or files a predictor cannot learn from or use; the message says what to do."""


def table_signature(table: pd.DataFrame) -> dict[str, Any]:
    signature = table.attrs.get(SIGNATURE_KEY)
    if signature is None:
        raise PredictorError("the feature table carries no signature; build it with predictor.features.FeatureBuilder")
    return signature


def check_signature(expected: dict[str, Any], got: dict[str, Any]) -> None:
    """Raise unless `got` describes the same base model and feature version as `expected`."""
    wrong = [f"{k}: fitted on {expected.get(k)!r}, table has {got.get(k)!r}" for k in STRICT_FIELDS
             if expected.get(k) != got.get(k)]
    if wrong:
        raise PredictorError(
            "feature table does not match the predictor (" + "; ".join(wrong) + "); "
            "build the table with the FeatureBuilder of the model the predictor was fitted on, or refit"
        )
    if expected.get("importance_digest") != got.get("importance_digest"):
        logger.warning("feature table was built from different importance scores than the predictor was fitted on")


def finite_pairs(table: pd.DataFrame, metrics, min_pairs: int = MIN_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """(x (k, F), y (k,)) of the rows whose metric is finite; warns about the skipped ones."""
    y = np.asarray(metrics, dtype=np.float64).reshape(-1)
    if len(y) != len(table):
        raise PredictorError(f"{len(table)} feature rows but {len(y)} metrics; give one metric per architecture")
    x = table.to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise PredictorError("feature table holds NaN or infinite values; rebuild it with FeatureBuilder")
    ok = np.isfinite(y)
    if not ok.all():
        logger.warning("skipping %d of %d pairs with a non-finite metric (failed candidates): rows %s",
                       (~ok).sum(), len(y), np.flatnonzero(~ok).tolist())
    if (y[ok] <= 0).any():
        raise PredictorError("metrics must be positive (perplexity, lower is better); got values <= 0")
    if ok.sum() < min_pairs:
        raise PredictorError(
            f"{ok.sum()} finite architecture->metric pairs, the predictor needs at least {min_pairs}; "
            "measure more candidates before fitting"
        )
    return x[ok], y[ok]


class Predictor(abc.ABC):
    """Base of every predictor (XGBoost ensemble and the baselines): fit(table, metrics), predict(table)."""

    name = "predictor"
    min_pairs = MIN_PAIRS

    def fit(self, table: pd.DataFrame, metrics) -> Predictor:
        signature = table_signature(table)
        x, y = finite_pairs(table, metrics, self.min_pairs)
        self.columns_ = list(table.columns)
        self.signature_ = dict(signature)
        self.n_pairs_ = len(y)
        self.prior_ = _additive_line(x[:, self.columns_.index(ADDITIVE)], np.log(y)) if ADDITIVE in table else None
        self._fit(x, np.log(y) - self._prior(x))
        return self

    def predict(self, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(mean (N,), spread (N,)) on the metric's scale for each row of `table`."""
        x = self._features(table)  # (N, F)
        if len(x) == 0:
            return np.empty(0), np.empty(0)
        members = self._predict_members(x) + self._prior(x)  # (M, N) log metric
        return np.exp(members.mean(0)), np.exp(members).std(0)

    def _features(self, table: pd.DataFrame) -> np.ndarray:
        if not hasattr(self, "columns_"):
            raise PredictorError(f"{self.name} is not fitted; call fit(table, metrics) first")
        check_signature(self.signature_, table_signature(table))
        if list(table.columns) != self.columns_:
            raise PredictorError(
                f"feature columns differ from those the predictor was fitted on ({len(table.columns)} vs "
                f"{len(self.columns_)}); build the table with the same FeatureBuilder"
            )
        return table.to_numpy(dtype=np.float64)

    def _prior(self, x: np.ndarray) -> np.ndarray:
        """(N,) the additive line's log metric, or 0 without the column."""
        if self.prior_ is None:
            return np.zeros(len(x))
        a, b = self.prior_
        return a + b * x[:, self.columns_.index(ADDITIVE)]

    @abc.abstractmethod
    def _fit(self, x: np.ndarray, y: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _predict_members(self, x: np.ndarray) -> np.ndarray: ...


def _additive_line(additive: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of the least-squares  y ~ a + b * additive  with b >= 0."""
    b = max(float(np.polyfit(additive, y, 1)[0]), 0.0) if np.ptp(additive) > 0 else 0.0
    return float(y.mean() - b * additive.mean()), b
