"""The `python -m search.run` job end to end on a tiny locally built model."""

import json

import optuna
import pytest
import torch
from optuna.trial import TrialState

from pruning import adapter
from pruning.architecture import Architecture
from search import run
from search.config import RunConfig
from search.sampler import ARCH_ATTR
from search.timing import WindowCost, estimate
from search.trial_objective import TrialObjective


def args(root, out, *extra):
    return ["--model", str(root / "model"), "--calibration", str(root / "calibration.txt"),
            "--evaluation", str(root / "evaluation.txt"), "--seq-len", "32", "--calibration-windows", "8",
            "--search-windows", "4", "--sensitivity-windows", "4", "--n-startup", "5", "--ffn-step", "1", "--no-export",
            "--out", str(out), *extra]


def load(out):
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out}/study.db")


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    command = args(tiny_model_dir, out, "--budget", "75%", "--trials", "9")
    command.remove("--no-export")
    assert run.main([*command, "--recover-steps", "3", "--recover-windows", "8"]) == 0
    return out


@pytest.mark.slow
def test_run_writes_everything_a_person_needs(finished_run):
    out = finished_run
    for name in ("study.db", "run.json", "best_architecture.json", "summary.json", "summary.md", "predictor", "model"):
        assert (out / name).exists(), name
    assert len(list(out.glob("importance-wanda-*.safetensors"))) == 1
    summary = json.loads((out / "summary.json").read_text())
    arch = Architecture.from_json((out / "best_architecture.json").read_text())
    assert summary["best_params"] == arch.params()
    assert 0.995 * summary["budget_params"] <= arch.params() <= summary["budget_params"]
    assert summary["dashboard"] == f"optuna-dashboard sqlite:///{out}/study.db"
    complete = load(out).get_trials(states=(TrialState.COMPLETE,))
    assert summary["best_trial"] == min(complete, key=lambda t: t.value).number
    # where the time went, every stage of this invocation, in order; the summary prints it
    stages = ["load and check", "importance", "tables", "baselines (held-out)", "trials", "summary (held-out)",
              "export (re-fit, LoRA, write)"]
    assert list(summary["stage_seconds"]) == stages and all(v >= 0 for v in summary["stage_seconds"].values())
    assert "Time by stage: load and check " in (out / "summary.md").read_text()
    # the time plan estimates the same stages, by the same names (loading it leaves out)
    config = RunConfig(**json.loads((out / "run.json").read_text()))
    assert list(estimate(config, adapter.load_config(config.model), WindowCost(1.0, 1.0)).stages) == stages[1:]


@pytest.mark.slow
def test_summary_perplexities_are_the_models_on_the_held_out_windows(finished_run):
    from pruning.importance import load_or_compute
    from pruning.masking import masked
    from pruning.metrics import perplexity
    from search.setup import prepare

    summary = json.loads((finished_run / "summary.json").read_text())
    setup = prepare(RunConfig(**json.loads((finished_run / "run.json").read_text())))
    config = setup.config
    importance = load_or_compute(setup.model, setup.calibration, config.importance, finished_run, config.batch_size)
    arch = Architecture.from_json((finished_run / "best_architecture.json").read_text())
    assert summary["base_perplexity"] == pytest.approx(perplexity(setup.model, setup.held_out_windows), rel=1e-6)
    with masked(setup.model, arch, importance):
        assert summary["best_perplexity"] == pytest.approx(perplexity(setup.model, setup.held_out_windows), rel=1e-6)


@pytest.mark.slow
def test_run_exports_the_recovered_best_model(finished_run):
    from transformers import AutoModelForCausalLM

    summary = json.loads((finished_run / "summary.json").read_text())
    recovery = summary["recovery"]
    assert recovery["export"] == str(finished_run / "model")
    assert set(recovery) >= {"dense", "pruned", "recovered", "selected_step", "validation"}
    steps, ppls = zip(*recovery["validation"], strict=True)
    assert steps == (0, 1, 2, 3)  # the sliced model, then every step of three
    assert recovery["selected_step"] == steps[ppls.index(min(ppls))]
    markdown = (finished_run / "summary.md").read_text()
    assert f"after 3 LoRA steps (step {recovery['selected_step']} kept, best on the search windows)" in markdown
    assert markdown.count("**Note**") == len(recovery.get("notes", []))
    model = AutoModelForCausalLM.from_pretrained(finished_run / "model", trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == summary["best_params"]
    from pruning.metrics import perplexity
    from search.setup import prepare

    setup = prepare(RunConfig(**json.loads((finished_run / "run.json").read_text())))
    held_out = setup.held_out_windows
    assert recovery["recovered"]["perplexity"] == pytest.approx(perplexity(model, held_out), rel=1e-5)
    # the slice was re-fitted (pruning.reconstruct on the calibration windows) before tuning, and both are recorded
    from pruning.importance import load_or_compute
    from pruning.masking import masked
    from pruning.reconstruct import DAMP_CHOICES, ReconstructionConfig, reconstructed

    arch = Architecture.from_json((finished_run / "best_architecture.json").read_text())
    importance = load_or_compute(setup.model, setup.calibration, "wanda", finished_run)
    with masked(setup.model, arch, importance):
        assert recovery["unreconstructed"]["perplexity"] == pytest.approx(perplexity(setup.model, held_out), rel=1e-5)
        unfitted_search = perplexity(setup.model, setup.search_windows)
    refits = {}  # damp -> (held-out, search windows) perplexity of the re-fit slice, at every damping tried
    for damp in DAMP_CHOICES:
        with reconstructed(setup.model, arch, importance, setup.calibration, ReconstructionConfig(damp=damp)):
            refits[damp] = perplexity(setup.model, held_out), perplexity(setup.model, setup.search_windows)
    assert [d for d, _ in recovery["reconstruction_damps"]] == list(DAMP_CHOICES)
    assert [p for _, p in recovery["reconstruction_damps"]] == pytest.approx([refits[d][1] for d in DAMP_CHOICES],
                                                                             rel=1e-5)
    # the best re-fit on the search windows is kept, and only where it lowers their perplexity (validation data,
    # as recovery selects)
    best = min(DAMP_CHOICES, key=lambda d: refits[d][1])
    refitted, refitted_search = refits[best]
    assert recovery["reconstruction_search"] == pytest.approx([unfitted_search, refitted_search], rel=1e-5)
    kept = refitted_search < unfitted_search
    expected = refitted if kept else recovery["unreconstructed"]["perplexity"]
    assert recovery["pruned"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert (f"reconstructed (damp {best:g}, best of 3 on the search windows) in "
            f"{recovery['reconstruction_seconds']:.0f} s; " in markdown) == kept
    assert ("so it was undone" in markdown) == (not kept)
    assert load(finished_run).user_attrs["recovery"] == recovery
    assert summary["objective_values"]["searched"] == {"perplexity": summary["best_perplexity"]}
    assert summary["objective_values"]["uniform"] == {"perplexity": summary["uniform_perplexity"]}
    card = (finished_run / "model" / "README.md").read_text()
    for row in ("base model (dense)", "uniform", "threshold", "knapsack", "searched", "this model, after recovery"):
        assert f"| {row} | " in card


@pytest.mark.slow
def test_trials_record_what_was_measured_and_predicted(finished_run):
    study = load(finished_run)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 9
    archs = [t.user_attrs[ARCH_ATTR] for t in trials]
    assert len(set(archs)) == 9, "an architecture was measured twice"
    phases = [t.system_attrs["phase"] for t in trials]
    assert phases == ["startup"] * 5 + ["guided"] * 4  # with a sensitivity table, no blind exploration trials
    guided = [t for t in trials if t.system_attrs["phase"] in ("guided", "explore")]
    assert all(t.system_attrs["predicted_spread"] >= 0 and t.system_attrs["predicted"] > 0 for t in guided)
    assert all(t.user_attrs["wall_time_s"] > 0 and 0 < t.user_attrs["param_ratio"] < 1 for t in trials)
    assert set(study.user_attrs["baselines"]) == {"base", "uniform", "threshold", "knapsack"}
    table = study.user_attrs["sensitivity"]
    # two tables: around the dense model and around its knapsack, each with its base's own pass
    assert table["windows"] == 4 and table["tables"] == 2
    assert table["windows_evaluated"] == (table["measurements"] + 2) * 4


@pytest.mark.slow
def test_the_search_starts_from_the_knapsack_and_reports_on_held_out_windows(finished_run):
    from pruning.importance import load_or_compute
    from pruning.masking import masked
    from pruning.metrics import perplexity
    from search.knapsack import knapsack
    from search.runner import Prepared, SearchRun
    from search.setup import prepare

    study = load(finished_run)
    config = run.RunConfig(**json.loads((finished_run / "run.json").read_text()))
    setup = prepare(config)
    importance = load_or_compute(setup.model, setup.calibration, config.importance, finished_run)
    tables = SearchRun(config).tables(Prepared(setup, None, study, importance))  # read back from the cache
    dense, local = tables.dense, tables.local
    rival = knapsack(setup.space, dense)
    assert local.base == rival  # the second table is measured around the rival
    assert study.trials[0].user_attrs[ARCH_ATTR] == rival.to_json()
    assert study.trials[1].user_attrs[ARCH_ATTR] == knapsack(setup.space, local).to_json()
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["held_out_windows"] == len(setup.held_out_windows) == len(setup.final_windows) - 4
    with masked(setup.model, rival, importance):  # the first trial's value and the baseline, measured again here
        assert study.trials[0].value == perplexity(setup.model, setup.search_windows, config.batch_size)
        assert summary["knapsack_perplexity"] == perplexity(setup.model, setup.held_out_windows, config.batch_size)
    # on the held-out windows no trial saw, the searched model beats the uniform and threshold baselines, measured
    # apart (on this random tiny model by little: 401.52 against 401.57 and 402.91, fixed seeds; in 9 trials its
    # best is the knapsack it started from, so that is all the search is asked to beat here)
    assert summary["best_perplexity"] < min(summary["uniform_perplexity"], summary["threshold_perplexity"])
    assert summary["windows_evaluated"] == study.user_attrs["sensitivity"]["windows_evaluated"] + 9 * 4


@pytest.mark.slow
def test_rerun_resumes_without_remeasuring(finished_run, tiny_model_dir):
    before = {t.number: (t.value, t.datetime_complete) for t in load(finished_run).trials}
    assert run.main(args(tiny_model_dir, finished_run, "--budget", "75%", "--trials", "11")) == 0
    after = load(finished_run).trials
    assert len(after) == 11
    assert {t.number: (t.value, t.datetime_complete) for t in after[:9]} == before


SPY = """# `python -m search.run` with this argv, counting the passes pruning.sensitivity makes over windows
import atexit, runpy, sys
from pruning import sensitivity
calls, real = [], sensitivity.window_losses
def counted(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
sensitivity.window_losses = counted
atexit.register(lambda: print(f"sensitivity passes: {len(calls)}", file=sys.stderr))
sys.argv = ["search.run", *sys.argv[1:]]
runpy.run_module("search.run", run_name="__main__")
"""


def tables(out) -> dict[str, dict]:
    """The run directory's sensitivity-table caches: file name -> {option: rises}."""
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("sensitivity-*.json"))}


@pytest.mark.slow
def test_a_run_killed_while_measuring_its_table_resumes_where_it_stopped(tiny_model_dir, tmp_path):
    """SIGKILL (no handler runs) mid-table, then the same command: finished rows are read back, not measured
    again, and the run ends as the one never interrupted."""
    import os
    import pathlib
    import signal
    import subprocess
    import sys
    import time

    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    plain, killed = tmp_path / "plain" / "run", tmp_path / "killed" / "run"  # one study name for both
    command = [sys.executable, "-m", "search.run"]
    settings = ["--budget", "75%", "--trials", "6"]
    subprocess.run([*command, *args(tiny_model_dir, plain, *settings)], cwd=root, env=env, check=True,
                   capture_output=True)
    expected = tables(plain)
    assert len(expected) == 2  # the dense model's table and the one around its knapsack

    proc = subprocess.Popen([*command, *args(tiny_model_dir, killed, *settings)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not any(tables(killed).values()) and time.monotonic() < deadline:
        time.sleep(0.002)  # until the first row is cached
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    at_kill = tables(killed)
    done, total = sum(map(len, at_kill.values())), sum(map(len, expected.values()))
    assert 0 < done < total, "the kill must land while the table is being measured"
    assert load(killed).trials == []  # no trial had started

    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    resumed = subprocess.run([sys.executable, str(spy), *args(tiny_model_dir, killed, *settings)], cwd=root,
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # every option not cached at the kill, plus each table's base pass: the cached rows are not measured again
    assert f"sensitivity passes: {total - done + len(expected)}" in resumed.stderr
    assert tables(killed) == expected
    for name, rows in at_kill.items():
        assert {key: expected[name][key] for key in rows} == rows
    studies = [load(out) for out in (plain, killed)]
    assert studies[0].user_attrs["sensitivity"]["windows_evaluated"] == studies[1].user_attrs["sensitivity"][
        "windows_evaluated"]
    assert [(t.user_attrs[ARCH_ATTR], t.value) for t in studies[1].trials] == [
        (t.user_attrs[ARCH_ATTR], t.value) for t in studies[0].trials]
    summaries = [json.loads((out / "summary.json").read_text()) for out in (plain, killed)]
    assert summaries[1]["best_perplexity"] == summaries[0]["best_perplexity"]


@pytest.mark.slow
def test_mismatched_study_is_refused(finished_run, tiny_model_dir, capsys):
    assert run.main(args(tiny_model_dir, finished_run, "--budget", "60%", "--trials", "11")) == 2
    assert "already exists for a different budget" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "5X"], "cannot read budget"),
        (["--budget", "150%"], "not below the model"),
        (["--budget", "1K"], "raise the budget"),
        (["--sampler", "anneal"], "unknown sampler 'anneal'"),
        (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot open storage"),
        pytest.param(["--device", "cuda"], "sees no CUDA GPU; give --device cpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
        (["--device", "cuda:x"], "not a device name"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--ffn-step", "0"], "--ffn-step must be at least 1, got 0"),
        (["--ffn-step", "100000"], "--ffn-step must be in 1..40 (the model's FFN width), got 100000"),
        (["--seq-len", "65"], "--seq-len 65 is beyond the 64 positions"),
        (["--reconstruct-damp", "0"], "--reconstruct-damp must be positive, got 0.0"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert run.main(args(tiny_model_dir, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_is_named(tmp_path, capsys):
    assert run.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]) == 2
    assert "cannot load a model config" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def short_text(root, tokens: int) -> str:
    """About `tokens` tokens of the tiny model's evaluation text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    ids = tokenizer((root / "evaluation.txt").read_text(), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:tokens])


@pytest.mark.parametrize("case", ["missing calibration", "missing evaluation", "directory without text files",
                                  "directory of empty text", "evaluation leaves nothing held out", "budget 0",
                                  "budget 0%"])
def test_bad_data_or_budget_exits_2_says_what_to_change_and_writes_nothing(tiny_model_dir, tmp_path, capsys, case):
    missing, empty = tmp_path / "missing.txt", tmp_path / "notes"
    empty.mkdir()
    if case == "directory of empty text":
        (empty / "notes.txt").write_text("")
    else:
        (empty / "notes.bin").write_bytes(b"\0")  # a file, but not a text file
    short = tmp_path / "short.txt"
    short.write_text(short_text(tiny_model_dir, 3 * 32 + 8))  # 3 windows of 32 tokens: the 4 searched take all
    extra, message = {
        "missing calibration": (["--calibration", str(missing)], f"no such file or directory: '{missing}'; give a "
                                "text file, a directory of text files, or one of wikitext2, c4"),
        "missing evaluation": (["--evaluation", str(missing)], f"no such file or directory: '{missing}'; give a "
                               "text file, a directory of text files"),
        "directory without text files": (["--calibration", str(empty)], f"{empty} holds no text files (.json, "
                                         ".jsonl, .md, .py, .rst, .txt)"),
        "directory of empty text": (["--evaluation", str(empty)], "the evaluation text has 0 tokens, fewer than one "
                                    "window of 32; give more text or a shorter --seq-len"),
        "evaluation leaves nothing held out": (["--evaluation", str(short)], "the evaluation text gives 3 windows "
                                               "and the search measures all of them, so none is left to report on; "
                                               "give more evaluation text or fewer --search-windows"),
        "budget 0": (["--budget", "0"], "budget 0 is not positive; give e.g. 70% or 5B"),
        "budget 0%": (["--budget", "0%"], "budget 0% is not positive; give e.g. 70% or 5B"),
    }[case]
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "run"
    assert run.main(args(tiny_model_dir, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_interrupt_keeps_finished_trials_and_says_how_to_resume(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    measure = TrialObjective.measure
    calls = []

    def interrupt_third(self, trial, arch):
        calls.append(trial.number)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return measure(self, trial, arch)

    monkeypatch.setattr(TrialObjective, "measure", interrupt_third)
    command = args(tiny_model_dir, out, "--budget", "75%", "--trials", "6", "--sampler", "random")
    assert run.main(command) == 130
    assert "resume with: python -m search.run" in capsys.readouterr().err
    states = [t.state for t in load(out).trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    monkeypatch.setattr(TrialObjective, "measure", measure)
    assert run.main(command) == 0
    trials = load(out).trials
    assert [t.state for t in trials[:3]] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL]
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6  # the interrupted trial is not a measurement


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "gp"])
def test_peer_samplers_search_the_same_space(tiny_model_dir, tmp_path, sampler):
    out = tmp_path / sampler
    assert run.main(args(tiny_model_dir, out, "--budget", "75%", "--trials", "6", "--sampler", sampler)) == 0
    budget = load(out).user_attrs["identity"]["budget"]
    complete = load(out).get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) + len(load(out).get_trials(states=(TrialState.PRUNED,))) == 6
    for t in complete:
        arch = Architecture.from_json(t.user_attrs[ARCH_ATTR])
        assert 0.995 * budget <= arch.params() <= budget
        assert t.user_attrs["params"] == arch.params() and t.value > 1



def test_recovery_notes_say_when_the_export_is_not_better():
    import torch

    from finetune.evaluate import EvalData
    from search.recovery import recovery_notes

    text = EvalData(torch.zeros(1, 4, dtype=torch.long))
    assert recovery_notes({"perplexity": 20.0}, {"perplexity": 18.0}, 40, text) == ()
    assert recovery_notes({"perplexity": 20.0}, {"perplexity": 20.0}, 0, text) == (
        "no recovery step improved the search windows' perplexity: the sliced model is exported untuned",)
    worse = recovery_notes({"perplexity": 133.3}, {"perplexity": 155.3}, 20, text)
    assert len(worse) == 1 and worse[0].startswith("held-out perplexity is worse after recovery (133.300 sliced, "
                                                   "155.300 exported)")
    task = recovery_notes({"perplexity": 20.0, "task_accuracy": 0.5}, {"perplexity": 19.0, "task_accuracy": 0.4}, 20,
                          text)
    assert task == ("held-out task accuracy is lower after recovery (0.500 sliced, 0.400 exported)",)


@pytest.mark.slow
def test_table_windows_reads_the_runs_table_and_its_own_row_is_the_runs_knapsack(finished_run, capsys):
    from experiments import table_windows

    assert table_windows.main(["--run", str(finished_run), "--windows", "1"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line[:3] in ("| 1", "| 2", "| 4")]
    own = json.loads((finished_run / "run.json").read_text())["sensitivity_windows"]
    knapsack = json.loads((finished_run / "summary.json").read_text())["objective_values"]["knapsack"]["perplexity"]
    assert [int(r[0].strip("| ")) for r in rows] == sorted({1, own})
    assert rows[-1][3] == f"{knapsack:.2f}"  # the run's own table gives the run's knapsack, measured again


@pytest.mark.slow
def test_export_cli_on_a_finished_run(finished_run, tmp_path, capsys):
    from search import export

    out = tmp_path / "exported"
    command = ["--run", str(finished_run), "--trial", "2", "--out", str(out), "--recover-steps", "0",
               "--recover-windows", "4"]
    assert export.main(command) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["export"] == str(out) and record["recovered"] is None
    assert record["unreconstructed"] is not None
    plain = tmp_path / "plain"
    assert export.main([*command[:5], str(plain), *command[6:], "--no-reconstruct"]) == 0
    unfitted = json.loads(capsys.readouterr().out)
    assert unfitted["unreconstructed"] is None and unfitted["reconstruction_seconds"] is None
    assert unfitted["pruned"]["perplexity"] == pytest.approx(record["unreconstructed"]["perplexity"], rel=1e-5)
    trial_arch = Architecture.from_json(load(finished_run).trials[2].user_attrs[ARCH_ATTR])
    assert f"{trial_arch.params():,}" in (out / "README.md").read_text()
    assert export.main(command) == 2
    assert "already exists" in capsys.readouterr().err
    assert export.main(["--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "--run must be a directory made by search.run" in capsys.readouterr().err
    assert export.main(["--run", str(finished_run), "--trial", "999", "--out", str(tmp_path / "y")]) == 2
    assert "trial 999 has no measured architecture" in capsys.readouterr().err


@pytest.mark.slow
def test_exporting_the_best_architecture_reuses_the_summarys_held_out_measurements(finished_run, tmp_path, capsys):
    from search import export

    values = json.loads((finished_run / "summary.json").read_text())["objective_values"]
    command = ["--run", str(finished_run), "--recover-steps", "0", "--out"]
    assert export.main([*command, str(tmp_path / "refit")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["dense"] == values["base"] and record["unreconstructed"] == values["searched"]
    assert export.main([*command, str(tmp_path / "plain"), "--no-reconstruct"]) == 0
    sliced = json.loads(capsys.readouterr().out)["pruned"]  # measured on the sliced model, not reused
    assert sliced["perplexity"] == pytest.approx(values["searched"]["perplexity"], rel=1e-5)


@pytest.mark.slow
def test_export_cli_does_not_hide_programming_errors(finished_run, tmp_path, monkeypatch):
    from search import export, recovery

    def broken(*args, **kwargs):
        raise KeyError("a bug, not the user's input")

    monkeypatch.setattr(recovery, "recover_and_export", broken)
    with pytest.raises(KeyError, match="a bug"):
        export.main(["--run", str(finished_run), "--out", str(tmp_path / "z"), "--recover-steps", "0"])


@pytest.mark.slow
def test_export_cli_writes_gguf_or_refuses_what_the_type_cannot_hold(finished_run, tmp_path, capsys):
    import gguf

    from search import export

    out = tmp_path / "model.gguf"
    command = ["--run", str(finished_run), "--trial", "2", "--out", str(out), "--recover-steps", "0",
               "--recover-windows", "4", "--format", "gguf"]
    assert export.main([*command, "--gguf-type", "q8_0"]) == 2  # hidden 48 is not a multiple of 32
    assert "GGUF q8_0 stores rows in blocks of 32" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert export.main([*command, "--gguf-type", "f16"]) == 0
    assert json.loads(capsys.readouterr().out)["export"] == str(out)
    trial_arch = Architecture.from_json(load(finished_run).trials[2].user_attrs[ARCH_ATTR])
    reader = gguf.GGUFReader(out)
    arch_name = reader.fields["general.architecture"].contents()
    assert reader.fields[f"{arch_name}.block_count"].contents() == len(trial_arch.layers)


@pytest.mark.slow
def test_the_objective_table_shows_a_task_run_s_accuracy_once(finished_run):
    from dataclasses import replace

    from search.recovery import RecoveryRecord
    from search.report import RunSummary

    summary = RunSummary.from_json((finished_run / "summary.json").read_text())
    metrics = {"perplexity": 8.0, "task": 0.375, "task_accuracy": 0.375}  # what a task run's recovery records
    recovery = RecoveryRecord(dense=metrics, pruned=metrics, export="model", recovered=metrics)
    headers = {}
    for objective in ("task", "kl"):
        run = replace(summary, objective=objective, objective_values={"base": {"perplexity": 9.0, objective: 0.5}},
                      recovery=recovery)
        headers[objective] = next(line for line in run.to_markdown().splitlines()
                                  if line.startswith("| model | perplexity"))
    assert headers["task"] == "| model | perplexity | task |"
    assert "task_accuracy" in headers["kl"]  # with another objective it is the only accuracy shown


@pytest.mark.slow
def test_export_cli_tunes_on_several_domains_and_a_task(finished_run, tiny_model_dir, tmp_path, capsys):
    from search import export

    rows = [{"q": f"what is {i} plus {i}", "options": [str(2 * i), str(2 * i + 1)], "answer": 0} for i in range(10)]
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in rows))
    command = ["--run", str(finished_run), "--out", str(tmp_path / "tuned"), "--recover-steps", "2",
               "--recover-windows", "4", "--domain", f"extra={tiny_model_dir / 'evaluation.txt'}",
               "--task", str(task), "--task-template", "Q: {q}\nA:", "--shots", "2", "--distill", "0.5"]
    assert export.main(command) == 0
    record = json.loads(capsys.readouterr().out)
    assert 0 <= record["recovered"]["task_accuracy"] <= 1
    assert record["recovery"]["distill_weight"] == 0.5
    bad = ["--run", str(finished_run), "--out", str(tmp_path / "bad"), "--domain", "no-equals-sign"]
    assert export.main(bad) == 2
    assert "--domain takes NAME=PATH" in capsys.readouterr().err


def test_gguf_target_sets_the_ffn_step_and_the_export_path(tmp_path):
    from search.config import RunLayout

    assert RunConfig().ffn_step == 8
    assert RunConfig(export_format="gguf").ffn_step == 32  # q8_0 blocks: every width the search picks fits
    assert RunConfig(export_format="gguf", gguf_type="f16").ffn_step == 8
    assert RunLayout(tmp_path).export_path(RunConfig(export_format="gguf")) == tmp_path / "model.gguf"
    assert RunLayout(tmp_path).export_path(RunConfig()) == tmp_path / "model"


def test_the_refit_kept_is_the_best_damping_on_the_search_windows_and_only_where_it_helps():
    from search.recovery import Refit

    tried = ((1e-4, 9.0), (1e-2, 8.5), (1e-1, 8.7))
    assert Refit(10.0, tried, 1.0).damp == 1e-2
    assert Refit(8.5, tried, 1.0).damp is None  # no damping lowers the unfitted slice's perplexity
