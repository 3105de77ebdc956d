"""What reconstruction (`pruning.reconstruct`) costs at export, against what a trial costs, on one model.

    python -m experiments.bench_reconstruct [--model DIR|FILE.gguf] [--budget 65%] [--seq-len 256]
                                            [--calibration FILE] [--evaluation FILE] [--search-windows 32]

Measured in one run, on the uniform architecture at --budget (the re-fit's cost hardly depends on which
architecture; its quality does, which `experiments.compare` and `experiments.reconstruct_study` measure):

- seconds of one re-fit (the export's: in place, default settings) ÷ seconds of one trial (the search windows'
  perplexity of the same candidate, masked, as the search measures it); the issue's target is at most 4;
- extra peak memory of the re-fit ÷ the model's weight bytes: the peak of the tensors created while it runs,
  counted exactly by `PeakTensorMemory` (the CPU analogue of `max_memory_allocated` less what existed before),
  next to the analytic bound of `experiments.reconstruct_study.memory_bound`; the target is at most 0.2.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from experiments import provenance
from experiments.bench_recovery import PeakTensorMemory
from experiments.reconstruct_study import memory_bound
from pruning.importance import compute_importance
from pruning.masking import masked
from pruning.metrics import perplexity
from pruning.reconstruct import DEFAULT_DAMP, ReconstructionConfig, reconstruct
from search.config import RunConfig
from search.setup import prepare_or_say_why


def main(argv: list[str] | None = None) -> int:
    d = RunConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.bench_reconstruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model)
    p.add_argument("--budget", default="65%")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--calibration", default=d.calibration)
    p.add_argument("--evaluation", default=d.evaluation)
    p.add_argument("--search-windows", type=int, default=d.search_windows)
    args = p.parse_args(argv)
    config = RunConfig(model=args.model, budget=args.budget, seq_len=args.seq_len, calibration=args.calibration,
                       evaluation=args.evaluation, search_windows=args.search_windows,
                       out="runs/bench-reconstruct", export=False)
    setup = prepare_or_say_why(config)
    if setup is None:
        return 2
    model, batch = setup.model, config.batch_size
    importance = compute_importance(model, setup.calibration, config.importance, batch)
    arch = setup.space.uniform()
    started = time.perf_counter()
    with masked(model, arch, importance):
        perplexity(model, setup.search_windows, batch)
    trial = time.perf_counter() - started
    settings = ReconstructionConfig(damp=config.reconstruct_damp or DEFAULT_DAMP, batch_size=batch)
    started = time.perf_counter()
    with PeakTensorMemory() as tracker:
        reconstruct(model, arch, importance, setup.calibration, settings)
    refit = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bound, _ = memory_bound(setup.space.spec, min(settings.windows, len(setup.calibration)), config.seq_len,
                            next(model.parameters()).element_size())
    print(provenance.header("experiments.bench_reconstruct", argv), end="")
    print(f"{args.model}: uniform architecture at {args.budget}, {torch.get_num_threads()} threads\n\n"
          f"| measure | value |\n|---|--:|\n"
          f"| one trial ({len(setup.search_windows)} windows of {config.seq_len} tokens) | {trial:.1f} s |\n"
          f"| one re-fit ({min(settings.windows, len(setup.calibration))} calibration windows) | {refit:.1f} s |\n"
          f"| re-fit ÷ trial (target ≤ 4) | {refit / trial:.2f} |\n"
          f"| extra peak memory ÷ weights, measured (target ≤ 0.2) | {tracker.peak / weights:.3f} |\n"
          f"| extra peak memory ÷ weights, analytic bound | {bound / weights:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
