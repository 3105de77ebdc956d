"""search.record: the study's own state reads back as written, in the layout studies have always had."""

import optuna
import pytest

from search.record import StudyRecord, TablesCost

# as runs before the record wrote them (a kl run: perplexities, then the objective beside them)
OLD = {
    "identity": {"model": "m", "objective": "kl", "objective_settings": {"top_k": 64}},
    "sensitivity": {"tables": 2, "measurements": 48, "windows": 4, "windows_evaluated": 200, "seconds": 3.5},
    "baselines": {"base": 10.0, "uniform": 20.0, "threshold": 19.0, "knapsack": 15.0},
    "objective_baselines": {name: {"perplexity": ppl, "kl": kl} for name, ppl, kl in
                            (("base", 10.0, 0.0), ("uniform", 20.0, 1.5), ("threshold", 19.0, 1.4),
                             ("knapsack", 15.0, 0.9))},
    "recovery": {"export": "runs/x/model", "steps": 3},
}


def study_with(attrs: dict) -> optuna.Study:
    study = optuna.create_study()
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


def test_an_old_study_reads_as_one_record_and_writes_back_unchanged():
    record = StudyRecord.from_study(study_with(OLD))
    assert record.tables == TablesCost(2, 48, 4, 200, 3.5)
    assert record.baselines["uniform"] == {"perplexity": 20.0, "kl": 1.5}  # each model's metrics, once
    assert record.perplexities == OLD["baselines"] and record.has_objective_baselines
    assert record.to_attrs() == OLD
    fresh = optuna.create_study()
    record.to_study(fresh)
    assert fresh.user_attrs == OLD


def test_perplexity_baselines_alone_keep_their_layout():
    attrs = {"baselines": OLD["baselines"]}
    record = StudyRecord.from_study(study_with(attrs))
    assert record.baselines["knapsack"] == {"perplexity": 15.0} and not record.has_objective_baselines
    assert record.to_attrs() == attrs


def test_writing_a_field_keeps_what_the_record_leaves_unset():
    study = study_with({"identity": OLD["identity"], "baselines": OLD["baselines"]})
    StudyRecord(recovery=OLD["recovery"]).to_study(study)
    StudyRecord(tables=TablesCost(**OLD["sensitivity"])).to_study(study)
    assert study.user_attrs == {k: OLD[k] for k in ("identity", "baselines", "recovery", "sensitivity")}
    assert StudyRecord.from_study(optuna.create_study()) == StudyRecord()


def test_a_table_cost_an_older_run_wrote_without_a_key_reads_it_as_zero():
    record = StudyRecord.from_study(study_with({"sensitivity": {"measurements": 9, "windows": 4,
                                                                "windows_evaluated": 40}}))
    assert record.tables == TablesCost(measurements=9, windows=4, windows_evaluated=40)
    with pytest.raises(AttributeError):
        record.tables.tables = 1  # frozen
