"""The objective predictor: a Bayesian-bootstrap ensemble of small, monotone XGBoost regressors on log(metric).

Target. Perplexity of pruned candidates spans orders of magnitude and damage compounds
multiplicatively across layers, so members regress y = log(perplexity); predictions are mapped
back with exp (see `predictor.base`).

Model. Few pairs (10-40) and many correlated columns: shallow trees (depth 2), a small learning
rate with many rounds, L2 leaf regularisation and column subsampling. Every column has a known
direction (`predictor.features.direction`): keeping more units (mass, fractions, parameters) never
predicts a worse metric and dropping a sublayer never predicts a better one; these become XGBoost
monotone constraints, so the ensemble is monotone too (a mean of monotone functions is monotone).

Uncertainty. Member m is trained with Bayesian-bootstrap weights w = n * Dirichlet(1, ..., 1)
(Rubin 1981) and its own seed; the members' disagreement is the spread the sampler explores with.
Chosen over quantile regression because (a) what exploration needs is epistemic uncertainty
(how unsure the model is away from the measured pairs), while quantile loss models the noise
of y given x, which for a deterministic perplexity on fixed windows is nearly zero; (b) pinball
loss on 10-40 points gives crossing, degenerate quantiles; (c) averaging members smooths the step
functions of single trees, which breaks rank ties and helps ranking. Weights rather than resampled
rows keep every pair in every member, so no member sees a degenerate resample at n = 5.

Persistence: one UBJ file per member plus `predictor.json` (columns, feature signature,
versions, hyper-parameters). No pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

from predictor.base import Predictor, PredictorError
from predictor.features import FEATURE_VERSION, direction

PREDICTOR_VERSION = 1
FORMAT = "prunesearch.accuracy_predictor"  # the saved id, from before the class was renamed: saved predictors carry it
SIDECAR = "predictor.json"


@dataclass(frozen=True)
class BoosterConfig:
    """Hyper-parameters of every member, tuned for tens of pairs."""

    n_estimators: int = 300
    max_depth: int = 2
    learning_rate: float = 0.05
    min_child_weight: float = 1.0
    colsample_bynode: float = 0.5
    reg_lambda: float = 1.0
    monotone: bool = True

    def __post_init__(self) -> None:
        if self.n_estimators < 1 or self.max_depth < 1:
            raise ValueError(f"n_estimators and max_depth must be >= 1, got {self.n_estimators}, {self.max_depth}")
        if not 0 < self.learning_rate <= 1 or not 0 < self.colsample_bynode <= 1:
            raise ValueError("learning_rate and colsample_bynode must lie in (0, 1]")
        if self.min_child_weight < 0 or self.reg_lambda < 0:
            raise ValueError("min_child_weight and reg_lambda must be >= 0")


class ObjectivePredictor(Predictor):
    """`ObjectivePredictor(n_members=8, seed=0).fit(table, losses).predict(table) -> (mean, spread)`.

    The losses are the trial objective's, positive and lower-is-better (perplexity, KL, exp(-accuracy):
    `search.trials.to_loss`)."""

    name = "xgboost"

    def __init__(self, n_members: int = 8, seed: int = 0, config: BoosterConfig | None = None):
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        self.n_members, self.seed = n_members, seed
        self.config = config or BoosterConfig()

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        c = self.config
        constraints = tuple(direction(col) for col in self.columns_) if c.monotone else None
        self.boosters_ = []
        for m in range(self.n_members):
            rng = np.random.default_rng([self.seed, m])
            weights = len(y) * rng.dirichlet(np.ones(len(y)))  # (n,) Bayesian bootstrap, mean 1
            reg = xgb.XGBRegressor(
                n_estimators=c.n_estimators, max_depth=c.max_depth, learning_rate=c.learning_rate,
                min_child_weight=c.min_child_weight, colsample_bynode=c.colsample_bynode, reg_lambda=c.reg_lambda,
                monotone_constraints=constraints, tree_method="hist", n_jobs=1,
                random_state=int(rng.integers(2**31)),
            )
            reg.fit(x, y, sample_weight=weights)
            self.boosters_.append(reg.get_booster())

    def _predict_members(self, x: np.ndarray) -> np.ndarray:
        return np.stack([b.inplace_predict(x) for b in self.boosters_]).astype(np.float64)  # (M, N)

    def save(self, directory: str | Path) -> Path:
        """Write member_<m>.ubj files and the predictor.json sidecar into `directory`; returns it."""
        if not hasattr(self, "boosters_"):
            raise PredictorError("nothing to save: the predictor is not fitted")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        members = [f"member_{m}.ubj" for m in range(self.n_members)]
        for booster, name in zip(self.boosters_, members, strict=True):
            booster.save_model(str(out / name))
        sidecar = {
            "format": FORMAT,
            "predictor_version": PREDICTOR_VERSION,
            "feature_version": FEATURE_VERSION,
            "xgboost_version": xgb.__version__,
            "target": "log",
            "columns": self.columns_,
            "signature": self.signature_,
            "n_pairs": self.n_pairs_,
            "additive_prior": self.prior_,
            "n_members": self.n_members,
            "seed": self.seed,
            "config": asdict(self.config),
            "members": members,
        }
        (out / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> ObjectivePredictor:
        src = Path(directory)
        meta = _read_sidecar(src / SIDECAR)
        names = {f.name for f in fields(BoosterConfig)}
        predictor = cls(meta["n_members"], meta["seed"], BoosterConfig(**{k: meta["config"][k] for k in names}))
        predictor.columns_, predictor.signature_ = meta["columns"], meta["signature"]
        predictor.n_pairs_ = meta["n_pairs"]
        predictor.prior_ = tuple(meta["additive_prior"]) if meta.get("additive_prior") else None
        predictor.boosters_ = []
        for name in meta["members"]:
            booster = xgb.Booster()
            try:
                booster.load_model(str(src / name))
            except xgb.core.XGBoostError as err:
                raise PredictorError(f"cannot read member {src / name} ({err}); refit and save again") from err
            predictor.boosters_.append(booster)
        return predictor


def _read_sidecar(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PredictorError(f"{path} not found; give a directory written by ObjectivePredictor.save")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PredictorError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PredictorError(f"{path} is not an objective predictor sidecar (format {FORMAT!r} expected)")
    for key, current in (("predictor_version", PREDICTOR_VERSION), ("feature_version", FEATURE_VERSION)):
        if meta.get(key) != current:
            raise PredictorError(
                f"{path} was saved with {key} {meta.get(key)}, this code reads {current}; "
                "refit the predictor on the measured pairs and save it again"
            )
    return meta
