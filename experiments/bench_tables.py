"""What starting each sensitivity-table option at its own layer saves, on one model, measured in one run.

    python -m experiments.bench_tables [--model DIR|FILE.gguf] [--seq-len 256] [--windows 2] [--points 4]
                                       [--calibration FILE] [--evaluation FILE]

A dense table measures each sublayer alone at each grid size. The layers before the option's are dense in every
option of that layer, so `pruning.sensitivity.measure_sensitivity` runs them once and starts each option from the
hidden states entering its layer. This prints the seconds of that table ÷ the seconds of the same options each
run through the whole model (masked, as the table used to be measured), and the largest difference between the
two tables' entries (0: the same arithmetic).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from experiments import provenance
from pruning.architecture import Architecture
from pruning.importance import compute_importance
from pruning.masking import masked
from pruning.metrics import window_losses
from pruning.sensitivity import Grid, measure_sensitivity
from search.config import RunConfig
from search.setup import prepare_or_say_why


def whole_model_rises(model, importance, windows, grid: Grid, batch_size: int) -> dict[str, np.ndarray]:
    """Each option's NLL rise over the dense model, each option run through every layer: {"attention:i:size": (N,)}."""
    spec = importance.spec
    full = Architecture.full(spec)
    dense = window_losses(model, windows, batch_size)["nll"]
    out = {}
    for kind, layer, shape in grid.options(spec):
        arch = Architecture(spec, full.layers[:layer] + (shape,) + full.layers[layer + 1:])
        with masked(model, arch, importance):
            out[(kind, layer, shape)] = window_losses(model, windows, batch_size)["nll"] - dense
    return out


def main(argv: list[str] | None = None) -> int:
    d = RunConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.bench_tables", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--windows", type=int, default=2, help="table windows")
    p.add_argument("--points", type=int, default=4, help="grid sizes per sublayer")
    p.add_argument("--calibration", default=d.calibration)
    p.add_argument("--evaluation", default=d.evaluation)
    args = p.parse_args(argv)
    config = RunConfig(model=args.model, seq_len=args.seq_len, calibration=args.calibration,
                       evaluation=args.evaluation, search_windows=max(args.windows, 2),
                       out="runs/bench-tables", export=False)
    setup = prepare_or_say_why(config)
    if setup is None:
        return 2
    model, batch = setup.model, config.batch_size
    windows = setup.search_windows[: args.windows]
    importance = compute_importance(model, setup.calibration, config.importance, batch)
    grid = Grid.spread(importance.spec, args.points)
    started = time.perf_counter()
    table = measure_sensitivity(model, importance, windows, grid, ("nll",), batch)
    layerwise = time.perf_counter() - started
    started = time.perf_counter()
    whole = whole_model_rises(model, importance, windows, grid, batch)
    plain = time.perf_counter() - started
    spec = importance.spec
    worst = 0.0
    for (kind, layer, shape), rise in whole.items():
        shapes = grid.shapes(kind, Architecture.full(spec).layers[layer])
        worst = max(worst, float(np.abs(getattr(table, kind)["nll"][layer, shapes.index(shape)] - rise).max()))
    print(provenance.header("experiments.bench_tables", argv), end="")
    print(f"{len(whole)} options x {len(windows)} windows of {args.seq_len} tokens, {spec.num_layers} layers")
    print(f"table, each option from its layer: {layerwise:.1f} s; each option through the whole model: {plain:.1f} s")
    print(f"ratio {layerwise / plain:.2f}; largest difference between their entries: {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
