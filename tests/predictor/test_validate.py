import logging

import numpy as np
import pytest

from predictor.base import PredictorError
from predictor.baselines import MassProxy, RidgeBaseline
from predictor.model import ObjectivePredictor
from predictor.validate import RankReport, cross_validate, evaluate_holdout, rank_report, to_frame
from tests.predictor.conftest import known_metric


def test_rank_report_on_a_hand_example():
    r = rank_report("m", np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([2.0, 1.0, 3.0, 5.0, 4.0]), top_k=2, n_train=7)
    # discordant pairs (0,1) and (3,4) of 10: tau = (8 - 2) / 10; rho = 1 - 6 * 4 / (5 * 24)
    assert r.kendall == pytest.approx(0.6, abs=1e-12) and r.spearman == pytest.approx(0.8, abs=1e-12)
    assert (r.top_k, r.top_k_recall, r.top_k_overlap) == (2, 1.0, 1.0)
    assert r.mae == pytest.approx(0.8, abs=1e-12)
    assert r.mape == pytest.approx((1 / 2 + 1 / 1 + 0 + 1 / 5 + 1 / 4) / 5, abs=1e-12)
    assert (r.predictor, r.n_train, r.n_test) == ("m", 7, 5)
    missed = rank_report("m", np.array([3.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0]), top_k=1)
    assert (missed.top_k_recall, missed.top_k_overlap) == (0.0, 0.0)


def test_mass_proxy_ranks_a_mass_driven_metric_perfectly(table):
    r = cross_validate(lambda: MassProxy("mass_mean"), table, known_metric(table), folds=4)
    assert (r.kendall, r.spearman, r.top_k_recall, r.top_k_overlap) == (1.0, 1.0, 1.0, 1.0)
    assert (r.n_train, r.n_test) == (36, 48)


def test_xgboost_recovers_a_known_ranking(table):
    r = cross_validate(ObjectivePredictor, table, known_metric(table), folds=4, n_jobs=2)
    assert r.predictor == "xgboost"
    assert r.kendall > 0.85 and r.spearman > 0.95 and r.top_k_recall == 1.0
    assert r.mape < 0.1


def test_leave_one_out_and_skipped_failures(table, caplog):
    y = known_metric(table.iloc[:12])
    y[3] = np.nan
    with caplog.at_level(logging.WARNING, logger="predictor.validate"):
        r = cross_validate(RidgeBaseline, table.iloc[:12], y, folds=100)
    assert "validation skips 1 pairs with a non-finite metric" in caplog.text
    assert (r.n_train, r.n_test) == (10, 11)


def test_holdout_scores_the_test_set_only(table):
    y = known_metric(table)
    r = evaluate_holdout(lambda: MassProxy("mass_mean"), table.iloc[:10], y[:10], table.iloc[10:], y[10:], top_k=5)
    assert (r.n_train, r.n_test, r.kendall) == (10, 38, 1.0)
    frame = to_frame([r, r])
    assert list(frame.columns) == list(RankReport.__dataclass_fields__) and len(frame) == 2


def test_too_few_pairs_for_a_fold_is_an_error(table):
    with pytest.raises(PredictorError, match="needs at least 5"):
        cross_validate(RidgeBaseline, table.iloc[:6], known_metric(table.iloc[:6]), folds=2)
