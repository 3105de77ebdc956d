"""How well a predictor ranks architectures it has not seen: rank correlation, top-k recall, error.

For predictions p and measurements m of N held-out candidates (lower metric is better):

- kendall:       Kendall tau-b(p, m); spearman: Spearman rho(p, m)
- top_k_recall:  1 if the measured best is among the k predicted best, else 0 (averaged when repeated)
- top_k_overlap: |predicted top k ∩ measured top k| / k
- mae:           mean |p - m| on the metric's scale;  mape: mean |p - m| / m

`cross_validate` pools the out-of-fold predictions of k folds (leave-one-out when folds >= N)
and scores them once; folds run in parallel threads with joblib. `evaluate_holdout` fits on
one set and scores another (the experiment's train-on-n protocol).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy.stats import kendalltau, spearmanr
from sklearn.model_selection import KFold

from predictor.base import Predictor, PredictorError

logger = logging.getLogger(__name__)

PredictorFactory = Callable[[], Predictor]


@dataclass(frozen=True)
class RankReport:
    predictor: str
    n_train: int  # pairs each model was fitted on (the smallest fold for cross-validation)
    n_test: int
    kendall: float
    spearman: float
    top_k: int
    top_k_recall: float
    top_k_overlap: float
    mae: float
    mape: float

    def __post_init__(self) -> None:
        if self.n_test < 2 or self.top_k < 1:
            raise ValueError(f"a ranking needs n_test >= 2 and top_k >= 1, got {self.n_test}, {self.top_k}")

    def to_dict(self) -> dict:
        return asdict(self)


def rank_report(name: str, predicted: np.ndarray, measured: np.ndarray, top_k: int = 5, n_train: int = 0) -> RankReport:
    """Score predictions (N,) against measurements (N,), both on the metric's scale."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if p.shape != m.shape or p.ndim != 1:
        raise ValueError(f"predicted {p.shape} and measured {m.shape} must be equal-length vectors")
    k = min(top_k, len(m))
    predicted_top = set(np.argsort(p, kind="stable")[:k].tolist())
    measured_top = np.argsort(m, kind="stable")[:k]
    return RankReport(
        predictor=name, n_train=n_train, n_test=len(m),
        kendall=float(kendalltau(p, m).statistic), spearman=float(spearmanr(p, m).statistic),
        top_k=k, top_k_recall=float(measured_top[0] in predicted_top),
        top_k_overlap=len(predicted_top.intersection(measured_top.tolist())) / k,
        mae=float(np.abs(p - m).mean()), mape=float((np.abs(p - m) / m).mean()),
    )


def _finite(table: pd.DataFrame, metrics) -> tuple[pd.DataFrame, np.ndarray]:
    y = np.asarray(metrics, dtype=np.float64).reshape(-1)
    if len(y) != len(table):
        raise PredictorError(f"{len(table)} feature rows but {len(y)} metrics")
    ok = np.isfinite(y)
    if not ok.all():
        logger.warning("validation skips %d pairs with a non-finite metric (failed candidates)", (~ok).sum())
    return table.iloc[np.flatnonzero(ok)].reset_index(drop=True), y[ok]


def evaluate_holdout(
    make: PredictorFactory, train: pd.DataFrame, train_metrics, test: pd.DataFrame, test_metrics, top_k: int = 5
) -> RankReport:
    """Fit `make()` on the training pairs and score its ranking of the test pairs."""
    test, y_test = _finite(test, test_metrics)
    model = make().fit(train, train_metrics)
    mean, _ = model.predict(test)
    return rank_report(model.name, mean, y_test, top_k, n_train=model.n_pairs_)


def cross_validate(
    make: PredictorFactory, table: pd.DataFrame, metrics, folds: int = 5, seed: int = 0, top_k: int = 5,
    n_jobs: int | None = None,
) -> RankReport:
    """k-fold (shuffled with `seed`; leave-one-out when folds >= pairs) out-of-fold ranking quality."""
    table, y = _finite(table, metrics)
    if len(y) < 3:
        raise PredictorError(f"cross-validation needs at least 3 finite pairs, got {len(y)}")
    splits = list(KFold(n_splits=min(folds, len(y)), shuffle=True, random_state=seed).split(y))
    fitted = Parallel(n_jobs=n_jobs, prefer="threads")(
        delayed(_fit_predict)(make, table, y, train, test) for train, test in splits
    )
    predicted = np.empty_like(y)
    for (_, test), (mean, _) in zip(splits, fitted, strict=True):
        predicted[test] = mean
    name = fitted[0][1]
    return rank_report(name, predicted, y, top_k, n_train=min(len(train) for train, _ in splits))


def _fit_predict(make: PredictorFactory, table: pd.DataFrame, y: np.ndarray, train: np.ndarray,
                 test: np.ndarray) -> tuple[np.ndarray, str]:
    model = make().fit(table.iloc[train], y[train])
    return model.predict(table.iloc[test])[0], model.name


def to_frame(reports: Sequence[RankReport]) -> pd.DataFrame:
    return pd.DataFrame([r.to_dict() for r in reports])
