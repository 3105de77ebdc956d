"""Sampler comparison at equal numbers of measured trials, on the reference model.

    python -m experiments.compare_samplers [--budget 60%] [--trials 24 48] [--seeds 0 1 2]
        [--samplers predictor tpe gp random] [--out runs/compare_samplers]

Each (sampler, seed) is one `search.run` with max(--trials) trials; the best value among its
first n trials gives the column for n. Values are the search objective (perplexity on the
run's search windows); the uniform and importance-threshold baselines are measured on the same
windows. Writes results.csv and results.md to --out and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from pruning.importance import load_or_compute
from pruning.masking import masked
from pruning.metrics import perplexity
from search import run
from search.config import RunConfig
from search.setup import prepare


def best_within(study: optuna.Study, n: int) -> float:
    values = [t.value for t in study.trials[:n] if t.state == TrialState.COMPLETE and np.isfinite(t.value)]
    return min(values) if values else float("nan")


def baseline_rows(budget: str, search_windows: int, out: Path) -> list[dict]:
    setup = prepare(RunConfig(budget=budget, search_windows=search_windows, out=str(out / "baselines")))
    importance = load_or_compute(setup.model, setup.calibration, "wanda", out)
    rows = []
    for name, arch in (("uniform", setup.space.uniform()), ("importance threshold", setup.space.threshold(importance))):
        with masked(setup.model, arch, importance):
            rows.append({"method": name, "value": perplexity(setup.model, setup.search_windows)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="60%")
    p.add_argument("--trials", type=int, nargs="+", default=[24, 48])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samplers", nargs="+", default=["predictor", "tpe", "gp", "random"])
    p.add_argument("--search-windows", type=int, default=16, help="evaluation windows each trial is measured on")
    p.add_argument("--out", default="runs/compare_samplers")
    args = p.parse_args(argv)
    out = Path(args.out)
    records = []
    for sampler in args.samplers:
        for seed in args.seeds:
            run_dir = out / f"{sampler}-seed{seed}"
            code = run.main(["--budget", args.budget, "--trials", str(max(args.trials)), "--sampler", sampler,
                             "--seed", str(seed), "--search-windows", str(args.search_windows), "--no-export",
                             "--out", str(run_dir)])
            if code != 0:
                print(f"run {run_dir} failed with exit code {code}", file=sys.stderr)
                return code
            study = optuna.load_study(study_name=run_dir.name, storage=f"sqlite:///{run_dir}/study.db")
            for n in args.trials:
                records.append({"method": sampler, "seed": seed, "trials": n, "value": best_within(study, n)})
    table = pd.DataFrame(records)
    summary = table.groupby(["method", "trials"])["value"].agg(["mean", "std", "min"]).unstack("trials")
    summary.columns = [f"{stat} @{n}" for stat, n in summary.columns]
    baselines = pd.DataFrame(baseline_rows(args.budget, args.search_windows, out)).set_index("method")
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    text = (f"Best perplexity found (search windows), budget {args.budget}, seeds {args.seeds}\n\n"
            f"{summary.round(3).to_markdown()}\n\nBaselines (same windows):\n\n{baselines.round(3).to_markdown()}\n")
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
