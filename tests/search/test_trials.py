"""search.trials: the Measurement record round-trips through a real Optuna study, in either direction."""

import math

import numpy as np
import optuna
import pytest

from pruning.architecture import Architecture, LayerShape, ModelSpec
from search.trials import (
    Measurement,
    best_trial,
    measured,
    measurements,
    to_loss,
    write_candidate,
    write_outcome,
    write_proposal,
)

SPEC = ModelSpec("synthetic", "llama", vocab_size=10, hidden_size=16, num_layers=2, num_kv_heads=2, group_size=2,
                 head_dim=4, intermediate_size=8, tie_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False)


def arch(ffn: int) -> Architecture:
    return Architecture(SPEC, (LayerShape(2, 2, ffn), LayerShape(2, 2, 8)))


def study_with(direction: str, values: list[float], margins: list[float], target: str = "value") -> optuna.Study:
    study = optuna.create_study(direction=direction)
    for i, (v, m) in enumerate(zip(values, margins, strict=True)):
        trial = study.ask()
        write_candidate(trial, arch(i + 1), "host:1")
        learned, learned_direction = (v, direction) if target == "value" else (m, "maximize")
        write_outcome(trial, "task", 0.5 + i, {"margin": m}, loss=to_loss(learned, learned_direction))
        study.tell(trial, v)
    return study


def test_to_loss_is_the_value_or_exp_of_its_negation():
    assert to_loss(12.5, "minimize") == 12.5
    assert to_loss(0.75, "maximize") == pytest.approx(math.exp(-0.75))
    assert to_loss(-3.0, "maximize") == pytest.approx(math.exp(3.0))
    with pytest.raises(ValueError, match="direction"):
        to_loss(1.0, "up")


def test_a_measurement_reads_back_what_was_written():
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    write_proposal(study, study._storage.get_trial(trial._trial_id), "guided",
                   {"predicted": 0.61, "predicted_spread": 0.02})
    write_candidate(trial, arch(4), "host:7")
    write_outcome(trial, "task", 1.23456, {"margin": -0.5, "acc_norm": 0.5}, loss=math.exp(-0.5))
    study.tell(trial, 0.5)
    m = Measurement.from_trial(study.trials[0])
    full = Architecture.full(SPEC).params()
    assert m == Measurement(number=0, architecture=arch(4), objective="task", value=0.5,
                            metrics={"margin": -0.5, "acc_norm": 0.5}, loss=math.exp(-0.5), params=arch(4).params(),
                            param_ratio=arch(4).params() / full, wall_time_s=1.235, worker="host:7", phase="guided",
                            prediction=0.61, prediction_spread=0.02, error=None)
    assert m.ok
    with pytest.raises(ValueError, match="unknown proposal note"):
        write_proposal(study, study.trials[0], "guided", {"guess": 1.0})


def test_losses_follow_the_direction_and_the_predictor_target():
    values, margins = [0.5, 0.75, 0.75], [0.1, 0.3, 0.9]
    up = study_with("maximize", values, margins)
    archs, losses = measured(up)
    assert archs == [arch(1), arch(2), arch(3)]
    np.testing.assert_allclose(losses, np.exp(-np.array(values)))
    _, margin_losses = measured(study_with("maximize", values, margins, target="margin"))
    np.testing.assert_allclose(margin_losses, np.exp(-np.array(margins)))
    down = study_with("minimize", [9.0, 7.0, 8.0], margins)
    np.testing.assert_allclose(measured(down)[1], [9.0, 7.0, 8.0])


def test_best_trial_follows_the_direction_and_breaks_ties_by_the_loss():
    assert best_trial(study_with("minimize", [9.0, 7.0, 8.0], [0, 0, 0])).number == 1
    assert best_trial(study_with("maximize", [0.5, 0.75, 0.25], [0, 0, 0])).number == 1
    # accuracies 0.75 tie; with the margin learned, the larger margin (lower loss) wins
    assert best_trial(study_with("maximize", [0.5, 0.75, 0.75], [0.1, 0.3, 0.9], target="margin")).number == 2


def test_failed_and_pruned_trials_are_not_measurements():
    study = study_with("minimize", [3.0], [0.0])
    failed = study.ask()
    write_candidate(failed, arch(5), "host:1")
    write_outcome(failed, "perplexity", 0.1, error="out of memory")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    assert [m.number for m in measurements(study)] == [0]
    record = Measurement.from_trial(study.trials[1])
    assert record.error == "out of memory" and record.value is None and not record.ok


def test_two_trials_proposing_one_candidate_both_give_way_each_after_its_own_wait():
    """Two workers on one seed propose the same candidate at the same moment: neither measures it, and each
    waits a time that depends on its trial number, so their next proposals are made apart (without the wait
    the pair stayed in step and filled a shared study with pruned trials)."""
    import time

    from search.space import SearchSpace
    from search.trial_objective import GIVE_WAY_S, propose

    space = SearchSpace(SPEC, int(Architecture.full(SPEC).params() * 0.8))
    candidate = space.uniform()
    study = optuna.create_study()
    for _ in range(3):
        study.enqueue_trial(space.to_params(candidate))
    first, second = study.ask(), study.ask()  # both running, as two workers' trials are
    for trial in (first, second):  # both wrote the candidate before either checks (propose writes it again)
        write_candidate(trial, candidate, "host:1")
    waits = []
    for trial in (first, second):
        began = time.perf_counter()
        with pytest.raises(optuna.TrialPruned, match="already held by trial"):
            propose(trial, space)
        waits.append(time.perf_counter() - began)
    assert waits[0] >= GIVE_WAY_S * 1 and waits[1] >= GIVE_WAY_S * 2
    # a completed holder is no race: the duplicate gives way at once
    study.tell(first, 1.0)
    began = time.perf_counter()
    with pytest.raises(optuna.TrialPruned):
        propose(study.ask(), space)
    assert time.perf_counter() - began < GIVE_WAY_S
