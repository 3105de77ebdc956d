"""Samplers at equal cost: best-so-far against evaluation windows measured, on the reference model.

    python -m experiments.compare_samplers [--budget 50%] [--windows 1536] [--seeds 0 1 2]
        [--samplers predictor knapsack tpe random] [--out runs/compare_samplers] [-- search.run arguments]

Each (sampler, seed) is one `search.run` whose trials fill --windows evaluation windows: the
samplers that start from the sensitivity tables pay for them first (their windows count), the
others spend everything on trials. After `--`, search.run arguments shared by every run
(`-- --no-local-table` compares with the dense table alone). Values are the search objective
(perplexity on the run's search windows); the best candidate of each run is also measured on the
held-out windows no trial saw. Writes results.csv, results.md and curves.png to --out and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from experiments import provenance
from experiments.compare import run_config, share_tables
from pruning.files import write_atomic
from search import samplers
from search.pipeline import open_run_study, run_search
from search.record import StudyRecord
from search.runner import tables_cost


def curve(study: optuna.Study, start: int, per_trial: int) -> pd.DataFrame:
    """Best-so-far value after each finished trial, against the windows measured by then."""
    values = [t.value if t.state == TrialState.COMPLETE and np.isfinite(t.value) else np.inf for t in study.trials]
    best = np.minimum.accumulate(values)
    return pd.DataFrame({"trial": np.arange(1, len(values) + 1), "windows": start + per_trial * np.arange(
        1, len(values) + 1), "best": best})


def plot(curves: pd.DataFrame, rivals: dict[str, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (sampler, seed), group in curves.groupby(["sampler", "seed"]):
        color = f"C{sorted(curves['sampler'].unique()).index(sampler)}"
        ax.step(group["windows"], group["best"], where="post", color=color, alpha=0.8,
                label=sampler if seed == curves["seed"].min() else None)
    for i, (name, value) in enumerate(rivals.items()):
        ax.axhline(value, color="grey", linestyle=("--", ":")[i % 2], linewidth=1, label=name)
    ax.set(xlabel="evaluation windows measured (sensitivity table included)",
           ylabel="best perplexity so far (search windows)", title=title, yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="50%")
    p.add_argument("--windows", type=int, default=48 * 32, help="evaluation windows per run (default: 48 trials x 32)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samplers", nargs="+", default=["predictor", "knapsack", "tpe", "random"])
    p.add_argument("--out", default="runs/compare_samplers")
    p.add_argument("search_args", nargs=argparse.REMAINDER,
                   help="after --: python -m search.run arguments shared by every run, e.g. --no-local-table")
    args = p.parse_args(argv)
    out, extra = Path(args.out), [a for a in args.search_args if a != "--"]
    per_trial = run_config(extra).search_windows
    curves, finals, studies = [], [], []
    for seed in args.seeds:
        for sampler in args.samplers:
            run_dir = out / f"{sampler}-seed{seed}"
            config = run_config([*extra, "--budget", args.budget, "--sampler", sampler, "--seed", str(seed),
                                 "--no-export", "--out", str(run_dir)])
            share_tables(out, run_dir)  # the tables are the same for every seed; each run still counts their cost
            with redirect_stdout(sys.stderr):
                summary = run_search(config, windows=args.windows)
            study = open_run_study(summary)
            studies.append(study)
            start = tables_cost(study)
            c = curve(study, start, per_trial).assign(sampler=sampler, seed=seed)
            curves.append(c)
            at24 = c["best"].iloc[min(24, len(c)) - 1]
            finals.append({"sampler": sampler, "seed": seed, "trials": summary.trials_complete,
                           "windows": int(c["windows"].iloc[-1]),
                           "best (search windows)": c["best"].iloc[-1], "best after 24 trials": at24,
                           "24 within 5% of final": at24 <= 1.05 * c["best"].iloc[-1],
                           "best (held-out)": summary.best_perplexity,
                           "knapsack (held-out)": summary.knapsack_perplexity})
    curves, finals = pd.concat(curves), pd.DataFrame(finals)
    out.mkdir(parents=True, exist_ok=True)
    curves.to_csv(out / "curves.csv", index=False)
    finals.to_csv(out / "results.csv", index=False)
    first = studies[0]
    knapsack_value = first.trials[0].value if samplers.needs_tables(args.samplers[0]) else None
    rivals = {"uniform (held-out)": StudyRecord.from_study(first).baselines["uniform"]["perplexity"]}
    if knapsack_value is not None:
        rivals = {"sensitivity knapsack (search windows)": knapsack_value}
    plot(curves, rivals, out / "curves.png", f"best so far at {args.budget} kept, seeds {args.seeds}")
    text = (f"Budget {args.budget} kept, {args.windows} evaluation windows per run\n\n"
            f"{finals.round(2).to_markdown(index=False)}\n")
    write_atomic(out / "results.md", provenance.header("experiments.compare_samplers", argv) + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
