"""How many windows, and which loss, the sensitivity database needs.

    python -m experiments.sensitivity_study [--model DIR] [--points 8] [--candidates 24] [--out runs/sensitivity]

Measures the database once on all search windows with both losses (log-perplexity rise and KL
to the dense model), then, for the database read on its first n windows and each loss:

- tau: Kendall tau between the additive estimate and the measured perplexity of random candidates
  at 35% and 50% removed (measured on the search windows: nothing here is chosen on held-out text);
- the knapsack's architecture and its perplexity on the held-out windows (reported, not selected on).

Writes results.md and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

from experiments import provenance
from pruning.architecture import Architecture
from pruning.importance import load_or_compute
from pruning.masking import masked
from pruning.metrics import perplexity
from pruning.sensitivity import Grid, measure_sensitivity
from search.budget import parse_budget
from search.config import RunConfig
from search.knapsack import knapsack
from search.setup import prepare

REMOVED = ("35%", "50%")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=RunConfig().model)
    p.add_argument("--points", type=int, default=8)
    p.add_argument("--candidates", type=int, default=24, help="random candidates per budget for tau")
    p.add_argument("--windows", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--out", default="runs/sensitivity")
    args = p.parse_args(argv)
    out = Path(args.out)
    setup = prepare(RunConfig(model=args.model, out=str(out)))
    model, batch = setup.model, setup.config.batch_size
    importance = load_or_compute(model, setup.calibration, "wanda", out, batch)
    grid = Grid.spread(setup.space.spec, args.points)
    table = measure_sensitivity(model, importance, setup.search_windows, grid, ("nll", "kl"), batch, out)
    full = Architecture.full(setup.space.spec).params()
    rng = np.random.default_rng(0)
    spaces, candidates = {}, {}
    for removed in REMOVED:
        spaces[removed] = space = replace(setup.space, budget=parse_budget(f"{100 - float(removed[:-1]):g}%", full))
        archs = [space.random(rng) for _ in range(args.candidates)]
        values = []
        for arch in archs:
            with masked(model, arch, importance):
                values.append(perplexity(model, setup.search_windows, batch))
        candidates[removed] = (archs, np.array(values))
    rows = []
    for loss in ("nll", "kl"):
        for n in args.windows:
            sub = table.using(loss, n)
            row = {"loss": loss, "windows": n, "database windows": sub.measurements() * n}
            for removed in REMOVED:
                archs, values = candidates[removed]
                row[f"tau {removed}"] = kendalltau(sub.additive(archs), values).statistic
                with masked(model, knapsack(spaces[removed], sub), importance):
                    row[f"knapsack held-out {removed}"] = perplexity(model, setup.held_out_windows, batch)
            rows.append(row)
            print(row, file=sys.stderr)
    frame = pd.DataFrame(rows)
    text = (f"Sensitivity database on {Path(setup.config.model).name}: {table.measurements()} options, grid {grid}\n\n"
            f"{frame.round(3).to_markdown(index=False)}\n")
    (out / "results.md").write_text(provenance.header("experiments.sensitivity_study", argv) + text)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
