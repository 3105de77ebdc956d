"""The time plan: each stage's windows times the timed cost of a window (tiny local model, no weights read)."""

from __future__ import annotations

import math

import pytest
import torch

from pruning import adapter
from pruning.architecture import Architecture
from pruning.sensitivity import Grid
from search import run
from search.config import FINAL_EVAL_WINDOWS, RunConfig
from search.plan import table_windows
from search.timing import PREDICTOR_S, TEACHER_PASSES, TRAIN_PASSES, WindowCost, estimate, measure_window_cost


def config(root, **settings) -> RunConfig:
    return RunConfig(model=str(root / "model"), budget="60%", trials=5, search_windows=8, sensitivity_windows=2,
                     sensitivity_points=3, calibration_windows=16, batch_size=2, **settings)


def test_stages_are_their_windows_times_the_window_cost(tiny_model_dir):
    c = config(tiny_model_dir, local_table=False, export=False)
    model_config = adapter.load_config(c.model)
    spec = adapter.spec_from_config(model_config, c.model)
    L, E, M = spec.num_layers, FINAL_EVAL_WINDOWS - 8, 8
    p = estimate(c, model_config, WindowCost(layer=1.0, head=10.0))
    params, shared = Architecture.full(spec).params(), spec.shared_params()
    w, w_b = L * 1.0 + 10.0, 10.0 + L * (math.floor(0.6 * params) - shared) / (params - shared)
    assert list(p.stages) == ["importance", "tables", "baselines (held-out)", "trials", "summary (held-out)"]
    assert p.stages["importance"] == 16 * w and p.stages["summary (held-out)"] == pytest.approx(E * w_b)
    # the dense model; uniform, threshold and knapsack as sliced views
    assert p.stages["baselines (held-out)"] == pytest.approx(E * w + 3 * E * w_b)
    assert p.stages["trials"] == pytest.approx(5 * (M * w_b + PREDICTOR_S))
    assert p.total == pytest.approx(sum(p.stages.values()))
    # the head runs once per window the tables measure; the layers only from the option's own layer down
    assert estimate(c, model_config, WindowCost(0.0, 1.0)).stages["tables"] == table_windows(c, spec)
    per_layer = len(Grid.spread(spec, 3).options(spec)) // L  # the same count in every layer of the dense model
    started = sum(L - i for i in range(L)) * per_layer
    assert estimate(c, model_config, WindowCost(1.0, 0.0)).stages["tables"] == 2 * (started + L + L)


def test_the_local_table_and_the_export_add_their_passes(tiny_model_dir):
    model_config = adapter.load_config(str(tiny_model_dir / "model"))
    plain = config(tiny_model_dir, local_table=False, export=False)
    cost = WindowCost(layer=1.0, head=10.0)
    full = estimate(config(tiny_model_dir, recover_steps=10, distill=0.0, reconstruct=False), model_config, cost)
    assert full.stages["tables"] > estimate(plain, model_config, cost).stages["tables"]
    spec = adapter.spec_from_config(model_config, plain.model)
    params, shared = Architecture.full(spec).params(), spec.shared_params()
    budget = math.floor(0.6 * params)  # --budget 60%
    w, w_b = spec.num_layers + 10.0, 10.0 + spec.num_layers * (budget - shared) / (params - shared)
    E, M = FINAL_EVAL_WINDOWS - 8, 8
    validations = 6  # steps 0, 2, 4, ..., 10
    assert full.stages["export (re-fit, LoRA, write)"] == pytest.approx(
        E * w_b + validations * M * w_b + 10 * 2 * TRAIN_PASSES * w_b + E * w_b)  # dense: the summary's
    distilled = estimate(config(tiny_model_dir, recover_steps=10, reconstruct=False), model_config, cost)
    assert distilled.stages["export (re-fit, LoRA, write)"] - full.stages["export (re-fit, LoRA, write)"] == \
        pytest.approx(TEACHER_PASSES * 10 * 2 * w)  # the dense targets on the rows 10 steps of 2 draw (< 512)
    kl = estimate(config(tiny_model_dir, recover_steps=10, distill=0.0, reconstruct=False, objective="kl"),
                  model_config, cost)
    assert kl.stages["export (re-fit, LoRA, write)"] - full.stages["export (re-fit, LoRA, write)"] == \
        pytest.approx(E * w)  # the dense model measured again: the summary holds only the kl objective's metrics


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_window_is_timed_on_one_random_layer_and_the_head(family):
    from tests.conftest import tiny_config

    cost = measure_window_cost(tiny_config(family), seq_len=16, batch_size=2, device=torch.device("cpu"),
                               dtype=torch.float32)
    assert cost.layer > 0 and cost.head >= 0 and cost.model(3) == 3 * cost.layer + cost.head


def test_dry_run_prints_the_time_plan(capsys, tmp_path):
    assert run.main(["--dry-run", "--out", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "time plan (one window: " in text and "  trials " in text and "  total " in text
