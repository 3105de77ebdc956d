"""Baselines the XGBoost predictor must beat, on the same features and log(metric) target.

- `MassProxy`: the zero-cost proxy. Ranks by one importance-mass column (more mass kept ->
  better); a least-squares line log(metric) = a + b * mass with b forced negative puts it on the
  metric's scale, so its ranking never depends on the pairs.
- `RidgeBaseline`: standardised features, ridge with alpha picked by efficient leave-one-out (RidgeCV).
- `ForestBaseline`: a random forest; its trees are the members, so it has a spread too.
- `AdditiveBaseline`: the sensitivity table's additive estimate alone (the knapsack's objective),
  put on the metric's scale by the base class's line; needs the ``additive_cost`` column.
"""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from predictor.base import Predictor, PredictorError

MIN_SLOPE = -1e-9  # per unit of mass; keeps the proxy's ranking strict when the pairs disagree with it


class MassProxy(Predictor):
    def __init__(self, column: str = "mass_total"):
        self.column = column
        self.name = f"proxy:{column}"

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.column not in self.columns_:
            raise PredictorError(f"the table has no column {self.column!r}; choose one of {self.columns_}")
        mass = x[:, self.columns_.index(self.column)]  # (n,)
        slope = np.polyfit(mass, y, 1)[0] if np.ptp(mass) > 0 else MIN_SLOPE
        self.slope_ = min(float(slope), MIN_SLOPE)
        self.intercept_ = float(y.mean() - self.slope_ * mass.mean())

    def _predict_members(self, x: np.ndarray) -> np.ndarray:
        return (self.intercept_ + self.slope_ * x[:, self.columns_.index(self.column)])[None]  # (1, N)


class RidgeBaseline(Predictor):
    name = "ridge"

    def __init__(self, alphas: tuple[float, ...] = tuple(np.logspace(-3, 3, 13))):
        self.alphas = alphas

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        self.model_ = make_pipeline(StandardScaler(), RidgeCV(alphas=self.alphas)).fit(x, y)

    def _predict_members(self, x: np.ndarray) -> np.ndarray:
        return self.model_.predict(x)[None]  # (1, N)


class ForestBaseline(Predictor):
    name = "random_forest"

    def __init__(self, n_estimators: int = 300, max_features: float = 0.33, seed: int = 0):
        self.n_estimators, self.max_features, self.seed = n_estimators, max_features, seed

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        self.model_ = RandomForestRegressor(
            n_estimators=self.n_estimators, max_features=self.max_features, random_state=self.seed, n_jobs=1
        ).fit(x, y)

    def _predict_members(self, x: np.ndarray) -> np.ndarray:
        return np.stack([tree.predict(x) for tree in self.model_.estimators_])  # (T, N)


class AdditiveBaseline(Predictor):
    name = "additive"

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.prior_ is None:
            raise PredictorError("the table has no additive_cost column; build it with FeatureBuilder(importance, "
                                 "sensitivity)")

    def _predict_members(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((1, len(x)))  # the prediction is the base class's additive line alone
