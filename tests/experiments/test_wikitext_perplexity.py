"""`python -m experiments.wikitext_perplexity`: every window of the text, the dense model, a run's slice and export."""

import json

import pytest
import torch

from experiments import wikitext_perplexity
from pruning import adapter
from pruning.data import token_windows
from pruning.metrics import perplexity
from search import run

pytestmark = pytest.mark.slow  # a search run end to end


def test_whole_text_perplexity_of_dense_slice_and_export(tiny_model_dir, tmp_path, capsys, monkeypatch):
    root, out = tiny_model_dir, tmp_path / "run"
    assert run.main(["--model", str(root / "model"), "--calibration", str(root / "calibration.txt"),
                     "--evaluation", str(root / "evaluation.txt"), "--seq-len", "32", "--calibration-windows", "8",
                     "--search-windows", "4", "--ffn-step", "1", "--trials", "3", "--budget", "75%",
                     "--recover-steps", "2", "--recover-windows", "8", "--out", str(out)]) == 0
    capsys.readouterr()
    text = root / "evaluation.txt"
    argv = ["--model", str(root / "model"), "--runs", str(out), "--text", str(text), "--seq-len", "16", "32",
            "--out", str(tmp_path / "wt")]
    assert wikitext_perplexity.main(argv) == 0
    table = capsys.readouterr().out
    results = json.loads((tmp_path / "wt" / "results.json").read_text())
    assert set(results) == {f"{m}@{t}" for m in ("dense", "run (sliced)", "run (export)") for t in (16, 32)}
    tokenizer = adapter.load_tokenizer(str(root / "model"))
    dense = adapter.load_model(str(root / "model"), torch.device("cpu"))
    for t in (16, 32):  # every window of the text, not the 128 the runs report on
        windows = token_windows(tokenizer, text.read_text(), t)
        assert len(windows) == len(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]) // t > 128
        assert results[f"dense@{t}"]["perplexity"] == pytest.approx(perplexity(dense, windows, 4), rel=1e-6)
        assert f"{len(windows):,} windows of {t}" in table
    summary = json.loads((out / "summary.json").read_text())
    assert results["run (sliced)@32"]["params"] == results["run (export)@32"]["params"] == summary["best_params"]
    assert results["dense@32"]["params"] == summary["base_params"]
    assert "| run (export) | " in table
    # finished rows are kept: a second call measures nothing again
    monkeypatch.setattr(wikitext_perplexity, "perplexity", lambda *a, **k: pytest.fail("measured again"))
    assert wikitext_perplexity.main(argv) == 0
    assert "| run (sliced) | " in capsys.readouterr().out
    assert json.loads((tmp_path / "wt" / "results.json").read_text()) == results


def test_a_directory_that_is_not_a_finished_run_exits_2(tiny_model_dir, tmp_path, capsys):
    argv = ["--model", str(tiny_model_dir / "model"), "--runs", str(tmp_path), "--text",
            str(tiny_model_dir / "evaluation.txt"), "--out", str(tmp_path / "wt")]
    assert wikitext_perplexity.main(argv) == 2
    assert "holds no best_architecture.json: give a finished run directory" in capsys.readouterr().err
    assert not (tmp_path / "wt").exists()
