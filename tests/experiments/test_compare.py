"""`python -m experiments.compare` end to end on a tiny model: every method, one budget, resumable."""

import json
import math

import optuna
import pytest

from experiments import compare
from pruning.metrics import perplexity
from search.config import RunConfig
from search.setup import prepare
from tests.conftest import optional_package, save_tiny_model_dir, tiny_config

pytestmark = pytest.mark.slow  # end to end: runs, subprocesses or servers
# 8 query heads in 2 KV groups, 8 wide: a shape whose heads Torch-Pruning 1.6 prunes (the tiny model's 6 heads,
# 3 per KV head, it cannot score: see test_torch_pruning_keeps_every_head_where_its_head_scoring_fails)
TORCH_PRUNING_SHAPE = dict(hidden_size=64, head_dim=8, num_attention_heads=8, num_key_value_heads=2)


@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-gqa"), **TORCH_PRUNING_SHAPE)


def search_args(root):
    """search.run arguments that make the tiny model's data, windows and recovery small."""
    return ["--calibration", str(root / "calibration.txt"), "--evaluation", str(root / "evaluation.txt"),
            "--seq-len", "32", "--calibration-windows", "8", "--search-windows", "4", "--sensitivity-windows", "4",
            "--n-startup", "5", "--ffn-step", "1", "--recover-steps", "2", "--recover-windows", "8"]


def argv(root, out, *extra):
    return ["--removed", "35%", "--model", str(root / "model"), "--trials", "6", "--out", str(out), *extra,
            "--", *search_args(root)]


def test_every_method_on_the_same_budget_then_resume(gqa_model_dir, tmp_path, capsys):
    optional_package("torch_pruning", 'pip install ".[bench]"')
    out = tmp_path / "compare"
    assert compare.main(argv(gqa_model_dir, out)) == 0
    saved = json.loads((out / "results.json").read_text())
    rebuilt = {r["method"]: r for r in saved["rows"] if r["reconstructed"]}
    rows = {r["method"]: r for r in saved["rows"] if not r["reconstructed"]}
    assert set(rows) == set(compare.METHODS)
    assert set(rebuilt) == set(compare.METHODS) - set(compare.NOT_RECONSTRUCTED)
    for method, r in rebuilt.items():  # the same architecture, re-fitted: no parameter more, measured apart
        assert r["params"] == rows[method]["params"], r
        # kept only where it lowered the search windows' perplexity, as in the export
        kept = "re-fit at damp" in r["note"]
        assert kept or "re-fit not kept" in r["note"], r
        assert (r["pruned"] != rows[method]["pruned"]) == kept, r
        assert math.isfinite(r["pruned"]) and math.isfinite(r["recovered"]), r
    summary = json.loads((out / "search-removed-35pct-seed0" / "summary.json").read_text())
    budget = summary["budget_params"]
    for r in rows.values():
        assert 0.85 * budget < r["params"] <= budget, r
        assert math.isfinite(r["pruned"]) and math.isfinite(r["recovered"]), r
    assert_torch_pruning_row(rows["Torch-Pruning"], gqa_model_dir, budget)
    assert rows["searched"]["measured"] == summary["trials_complete"] == 6
    table_cost = rows["sensitivity knapsack"]["windows"]
    assert table_cost == (rows["sensitivity knapsack"]["measured"] + 1) * 4  # the table reads all 4 search windows
    # the search pays for the rival's table and its own second one around the rival's knapsack (which measures
    # each sublayer only at the grid sizes next to its own: fewer than the first)
    tables = optuna.load_study(study_name=summary["study_name"], storage=summary["storage"]).user_attrs["sensitivity"]
    assert rows["searched"]["windows"] == summary["windows_evaluated"] == tables["windows_evaluated"] + 6 * 4
    assert table_cost < tables["windows_evaluated"] < 2 * table_cost
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert table.startswith("- Command: `python -m experiments.compare --removed 35% --model "), table[:200]
    assert table.count("| 35% |") == len(saved["rows"]) == 2 * len(compare.METHODS) - len(compare.NOT_RECONSTRUCTED)
    assert table.count(" + reconstruction |") == len(rebuilt)
    assert capsys.readouterr().out.startswith("Dense model:")

    # Same command again: nothing is re-measured, the table is rewritten from the saved rows.
    (out / "results.md").unlink()
    assert compare.main(argv(gqa_model_dir, out)) == 0
    assert json.loads((out / "results.json").read_text()) == saved
    assert (out / "results.md").read_text() == table

    # Other settings in the same directory are refused, and nothing is overwritten.
    assert compare.main(argv(gqa_model_dir, out, "--trials", "7")) == 2
    assert "other settings" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == saved


def assert_torch_pruning_row(row, root, budget):
    """The row is Torch-Pruning's own model at `budget`, pruned again here and measured on the held-out windows."""
    from experiments.torch_pruning_peer import count, prune_to_params

    setup = prepare(compare.run_config(["--model", str(root / "model"), *search_args(root), "--budget", "65%"]))
    assert setup.space.budget == budget
    model, ratio, head_ratio = prune_to_params(setup.model, budget)
    assert row["note"] == f"width ratio {ratio:.3f}, head ratio {head_ratio:.3f}"
    assert head_ratio == 0.25  # two of the 8 query heads go: the row is a pruned model, not the dense one
    assert row["params"] == count(model) < count(setup.model)
    assert row["pruned"] == pytest.approx(perplexity(model, setup.held_out_windows), rel=1e-5)
    assert row["recovered"] != row["pruned"]  # the same LoRA recovery ran on it


def test_torch_pruning_keeps_every_head_where_its_head_scoring_fails(tiny_model_dir, tmp_path):
    from experiments.torch_pruning_peer import count, head_scoring_fails, prune_to_params

    optional_package("torch_pruning", 'pip install ".[bench]"')
    out = tmp_path / "compare"
    assert compare.main(argv(tiny_model_dir, out, "--methods", "Torch-Pruning")) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    setup = prepare(compare.run_config(["--model", str(tiny_model_dir / "model"), *search_args(tiny_model_dir),
                                        "--budget", "65%"]))
    dense = setup.model.config
    # 6 query heads over 2 KV heads of 8 (16 values): Torch-Pruning 1.6 reshapes those 16 into 6 head rows
    assert head_scoring_fails(dense) and not head_scoring_fails(tiny_config(**TORCH_PRUNING_SHAPE))
    model, ratio, _ = prune_to_params(setup.model, setup.space.budget)
    assert row["note"] == f"width ratio {ratio:.3f}, every head kept (its head scoring fails on this GQA shape)"
    assert row["params"] == count(model) <= setup.space.budget
    attention = model.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (
        dense.num_attention_heads * dense.head_dim, dense.num_key_value_heads * dense.head_dim)
    assert model.config.hidden_size < dense.hidden_size and model.config.intermediate_size < dense.intermediate_size
    assert row["pruned"] == pytest.approx(perplexity(model, setup.held_out_windows), rel=1e-5)


def test_torch_pruning_failing_is_a_row_marked_failed_with_its_reason(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from experiments import torch_pruning_peer

    optional_package("torch_pruning", 'pip install ".[bench]"')
    # Without the heads-kept fallback, Torch-Pruning 1.6 itself breaks on the tiny model's 6-over-2 heads.
    monkeypatch.setattr(torch_pruning_peer, "head_scoring_fails", lambda config: False)
    out = tmp_path / "compare"
    assert compare.main(argv(tiny_model_dir, out, "--methods", "Torch-Pruning")) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    setup = prepare(compare.run_config(["--model", str(tiny_model_dir / "model"), *search_args(tiny_model_dir),
                                        "--budget", "65%"]))
    with pytest.raises(RuntimeError) as err:
        torch_pruning_peer.prune_to_params(setup.model, setup.space.budget)
    assert row["method"] == "Torch-Pruning" and row["note"] == f"failed: {err.value}"[:160]
    assert row["params"] == 0 and math.isnan(row["pruned"]) and math.isnan(row["recovered"])
    assert f"| 35% | Torch-Pruning | | | | | | | | | | | failed: {err.value}" in (out / "results.md").read_text()
    assert f"[compare] Torch-Pruning failed: {err.value!r}" in capsys.readouterr().err


def test_held_out_windows_exclude_the_search_windows(tiny_model_dir):
    from search.setup import prepare

    config = compare.run_config(["--model", str(tiny_model_dir / "model"), *search_args(tiny_model_dir)])
    assert isinstance(config, RunConfig) and config.search_windows == 4
    setup = prepare(config)
    held = setup.held_out_windows
    assert len(held) == len(setup.final_windows) - len(setup.search_windows)
    assert not (held[:, None, :] == setup.search_windows[None]).all(-1).any()


def test_our_methods_failing_is_an_error_not_a_row(tiny_model_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a regression in our own scoring")

    monkeypatch.setattr(compare, "compute_importance", broken)
    out = tmp_path / "compare"
    with pytest.raises(RuntimeError, match="a regression"):
        compare.main(argv(tiny_model_dir, out, "--methods", "uniform"))
    assert not (out / "results.md").exists()


@pytest.mark.parametrize("removed", ["120%", "0%", "half"])
def test_bad_share_exits_2(removed, tmp_path, capsys):
    assert compare.main(["--removed", removed, "--out", str(tmp_path / "c")]) == 2
    assert "--removed" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
