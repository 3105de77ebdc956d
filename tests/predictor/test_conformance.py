"""What every predictor (the XGBoost ensemble and each baseline) must do."""

import logging

import numpy as np
import pandas as pd
import pytest

from predictor.base import PredictorError
from predictor.baselines import ForestBaseline, MassProxy, RidgeBaseline
from predictor.model import BoosterConfig, ObjectivePredictor
from tests.predictor.conftest import known_metric

FACTORIES = {
    "xgboost": lambda: ObjectivePredictor(n_members=3, seed=0, config=BoosterConfig(n_estimators=60)),
    "proxy": MassProxy,
    "ridge": RidgeBaseline,
    "forest": lambda: ForestBaseline(n_estimators=50),
}

pytestmark = pytest.mark.parametrize("make", FACTORIES.values(), ids=FACTORIES.keys())


def test_predicts_positive_means_and_nonnegative_spreads(make, table):
    mean, spread = make().fit(table.iloc[:30], known_metric(table.iloc[:30])).predict(table.iloc[30:])
    assert mean.shape == spread.shape == (18,)
    assert (mean > 0).all() and (spread >= 0).all() and np.isfinite(mean).all()
    empty = make().fit(table, known_metric(table)).predict(table.iloc[:0])
    assert empty[0].shape == empty[1].shape == (0,)


def test_failed_candidates_are_skipped_with_a_warning(make, table, caplog):
    y = known_metric(table)
    y[[2, 7]] = [np.nan, np.inf]
    with caplog.at_level(logging.WARNING, logger="predictor.base"):
        model = make().fit(table, y)
    assert "skipping 2 of 48 pairs with a non-finite metric (failed candidates): rows [2, 7]" in caplog.text
    assert model.n_pairs_ == 46
    clean = make().fit(table.drop(index=[2, 7]), np.delete(y, [2, 7]))
    assert np.array_equal(model.predict(table)[0], clean.predict(table)[0])


def test_too_few_pairs_is_an_error(make, table):
    y = known_metric(table.iloc[:6])
    y[0] = np.nan
    y[1] = np.nan
    with pytest.raises(PredictorError, match="4 finite architecture->metric pairs, the predictor needs at least 5"):
        make().fit(table.iloc[:6], y)


def test_bad_metrics_are_errors(make, table):
    with pytest.raises(PredictorError, match="must be positive"):
        make().fit(table.iloc[:10], -known_metric(table.iloc[:10]))
    with pytest.raises(PredictorError, match="10 feature rows but 9 metrics"):
        make().fit(table.iloc[:10], known_metric(table.iloc[:9]))


def test_tables_without_signature_or_of_another_model_are_refused(make, table):
    model = make().fit(table, known_metric(table))
    with pytest.raises(PredictorError, match="carries no signature"):
        model.predict(pd.DataFrame(table.to_numpy(), columns=table.columns))
    other = table.copy()
    other.attrs = {k: dict(v) for k, v in table.attrs.items()}
    next(iter(other.attrs.values()))["base_model"] = "another-model"
    with pytest.raises(PredictorError, match="base_model: fitted on 'tiny-llama', table has 'another-model'"):
        model.predict(other)
    with pytest.raises(PredictorError, match="feature columns differ"):
        model.predict(table[table.columns[:-1]])


def test_unfitted_predictor_says_so(make, table):
    with pytest.raises(PredictorError, match="not fitted; call fit"):
        make().predict(table)
