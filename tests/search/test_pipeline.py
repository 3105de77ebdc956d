"""search.pipeline: the search as library calls returns what the CLI writes."""

import json
from dataclasses import replace

import pytest

from search.cli_args import parse_config
from search.objectives import KL
from search.pipeline import open_run_study, run_measurements, run_search
from search.report import RunSummary
from search.trials import best_trial
from tests.search.test_run import args


@pytest.mark.slow
def test_run_search_returns_the_summary_it_writes_and_the_measurements(tiny_model_dir, tmp_path):
    config = parse_config(args(tiny_model_dir, tmp_path / "kl", "--budget", "75%", "--trials", "6",
                               "--objective", "kl"))
    summary = run_search(config)
    assert summary == RunSummary.from_json((tmp_path / "kl" / "summary.json").read_text())
    assert summary.objective == "kl" and summary.objective_direction == "minimize"
    records = run_measurements(summary)
    assert len(records) == 6 and all(m.objective == "kl" and m.loss == m.value > 0 for m in records)
    assert summary.best_trial == best_trial(open_run_study(summary)).number
    base, searched = summary.objective_values["base"], summary.objective_values["searched"]
    assert base["kl"] == pytest.approx(0.0, abs=1e-6) and searched["kl"] > base["kl"]
    assert json.loads((tmp_path / "kl" / "summary.json").read_text())["objective_values"] == summary.objective_values
    # a second call resumes the finished run: nothing more is measured
    again = run_search(replace(config, trials=6))
    assert again.trials_complete == 6 and again.best_trial == summary.best_trial
    assert KL.direction == "minimize"


@pytest.mark.slow
def test_recover_architecture_slices_and_exports_any_architecture(tiny_model_dir, tmp_path):
    from pruning.importance import load_or_compute
    from pruning.masking import masked
    from pruning.metrics import perplexity
    from search.pipeline import recover_architecture
    from search.setup import prepare

    config = replace(parse_config(args(tiny_model_dir, tmp_path / "run", "--budget", "75%")), recover_steps=0)
    setup = prepare(config)
    arch = setup.space.uniform()
    record = recover_architecture(config, arch, tmp_path / "model")
    assert record.export == str(tmp_path / "model") and record.recovered is None and record.final == record.pruned
    importance = load_or_compute(setup.model, setup.calibration, config.importance, tmp_path / "run")
    assert record.dense["perplexity"] == pytest.approx(perplexity(setup.model, setup.held_out_windows), rel=1e-6)
    with masked(setup.model, arch, importance):  # the slice before reconstruction
        assert record.unreconstructed["perplexity"] == pytest.approx(perplexity(setup.model, setup.held_out_windows),
                                                                     rel=1e-5)
    from pruning.reconstruct import ReconstructionConfig, reconstructed

    damp = min(record.reconstruction_damps, key=lambda t: t[1])[0]  # the best on the search windows
    with reconstructed(setup.model, arch, importance, setup.calibration, ReconstructionConfig(damp=damp)):
        refitted = perplexity(setup.model, setup.held_out_windows)
        assert record.reconstruction_search[1] == pytest.approx(perplexity(setup.model, setup.search_windows),
                                                                 rel=1e-5)
    expected = refitted if record.reconstruction_kept else record.unreconstructed["perplexity"]
    assert record.pruned["perplexity"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_a_window_budget_sets_the_trials_after_the_tables(tiny_model_dir, tmp_path):
    from search.runner import tables_cost

    config = parse_config(args(tiny_model_dir, tmp_path / "run", "--budget", "75%", "--sensitivity-points", "3"))
    # 1 trial, to learn what the tables cost; then a budget of the tables and 5 trials of 4 windows, with 3 to spare
    tables = tables_cost(open_run_study(run_search(replace(config, out=str(tmp_path / "probe")), windows=1)))
    assert tables > 0
    summary = run_search(config, windows=tables + 5 * 4 + 3)
    assert summary.trials_complete == 5
    assert summary.windows_evaluated == tables + 5 * 4
