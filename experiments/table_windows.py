"""How many windows the sensitivity table needs on one run's model: the knapsack read on fewer of its windows.

    python -m experiments.table_windows --run RUN_DIR [--windows 1 2]

Reads the dense table a finished `search.run` measured (cached in its run directory, nothing is measured again)
and, for each n, keeps only the entries of the table windows a run with `--sensitivity-windows n` would have
measured (`search.runner.table_windows`: evenly spread over the search windows, first and last included, so
n = 1 and 2 are columns of a 4-window table). Prints the knapsack's perplexity on the search windows and on the
held-out windows for each n and for the run's own table, and what each table costs in windows.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from experiments import provenance
from pruning.data import evenly_spaced
from pruning.importance import load_or_compute
from pruning.masking import masked
from pruning.metrics import perplexity
from pruning.sensitivity import Grid, SensitivityTable, measure_sensitivity
from search.config import RunConfig, RunLayout
from search.knapsack import knapsack
from search.runner import table_windows
from search.setup import prepare_or_say_why


def fewer_windows(table: SensitivityTable, columns: list[int]) -> SensitivityTable:
    """The table with only the given window columns."""
    def pick(arrays: dict) -> dict:
        return {loss: a[..., columns] for loss, a in arrays.items()}

    return replace(table, attention=pick(table.attention), ffn=pick(table.ffn))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.table_windows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory made by search.run (with its dense table)")
    p.add_argument("--windows", type=int, nargs="+", default=[1, 2], help="table windows to read the knapsack on")
    args = p.parse_args(argv)
    layout = RunLayout(Path(args.run))
    if not layout.config.exists():
        print(f"error: {layout.config} not found; --run must be a directory made by search.run", file=sys.stderr)
        return 2
    config = replace(RunConfig(**json.loads(layout.config.read_text())), out=str(layout.root))
    setup = prepare_or_say_why(config)
    if setup is None:
        return 2
    model, batch = setup.model, config.batch_size
    importance = load_or_compute(model, setup.calibration, config.importance, layout.root, batch)
    grid = Grid.spread(setup.space.spec, config.sensitivity_points)
    table = measure_sensitivity(model, importance, table_windows(setup), grid, ("nll",), batch, layout.root)
    measured = evenly_spaced(len(setup.search_windows), config.sensitivity_windows).tolist()
    rows = []
    for n in sorted({*args.windows, config.sensitivity_windows}):
        wanted = evenly_spaced(len(setup.search_windows), n).tolist()
        if not set(wanted) <= set(measured):
            print(f"error: {n} table windows are not a subset of the run's {config.sensitivity_windows}; "
                  "pick n whose evenly spread windows the run measured (1 and 2 always are)", file=sys.stderr)
            return 2
        arch = knapsack(setup.space, fewer_windows(table, [measured.index(w) for w in wanted]))
        with masked(model, arch, importance):
            rows.append((n, table.measurements() * n, perplexity(model, setup.search_windows, batch),
                         perplexity(model, setup.held_out_windows, batch), arch.params()))
    print(provenance.header("experiments.table_windows", argv), end="")
    print(f"{config.model}, budget {config.budget}, {table.measurements()} table options, "
          f"{len(setup.search_windows)} search and {len(setup.held_out_windows)} held-out windows of {config.seq_len}")
    print()
    print("| table windows | windows measured | knapsack, search windows | knapsack, held-out | parameters |")
    print("|--:|--:|--:|--:|--:|")
    for n, cost, search, held, params in rows:
        print(f"| {n} | {cost:,} | {search:.2f} | {held:.2f} | {params:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
