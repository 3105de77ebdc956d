"""Engine benchmark: what the search pays per candidate, as ratios measured in one run.

    python -m experiments.bench_engine [--model DIR|FILE.gguf] [--budget 0.6] [--windows 32] [--seq-len 256]

Prints, against one plain forward pass over the same evaluation windows:
  - importance pass (hooks + running statistics) time ÷ plain forward time
  - masked candidate evaluation time ÷ plain forward time          (target <= 1.1)
  - sliced-view candidate evaluation time ÷ plain forward time     (what `as_candidate` measures where it fits:
                                                                    the view built and taken down included)
  - sliced model forward time ÷ plain forward time                 (the speed-up users get after export)
  - extra memory of masked evaluation ÷ model size                 (target <= 0.1)
  - extra memory of the sliced view ÷ model size (the kept weights of the pruned layers, copied)
Masked extra memory is the bytes allocated beyond the plain forward pass's own allocations (torch
profiler, CPU) plus the masks themselves: an upper bound on the extra peak.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from pruning import adapter, reference
from pruning.architecture import Architecture
from pruning.data import read_text, token_windows
from pruning.importance import compute_importance
from pruning.masking import masked, unit_masks, view_bytes
from pruning.metrics import perplexity
from pruning.slicing import slice_model, sliced_view
from search.space import SearchSpace


def timed(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def allocated_bytes(fn) -> int:
    """Bytes allocated (not freed-and-reused accounting: every allocation counts) while `fn` runs on CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.cpu_memory_usage, 0) for e in prof.events())


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(reference.MODEL_DIR))
    p.add_argument("--evaluation", default=str(reference.EVALUATION_TEXT))
    p.add_argument("--calibration", default=str(reference.CALIBRATION_TEXT))
    p.add_argument("--budget", type=float, default=0.6, help="share of parameters kept")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--uniform",
        type=float,
        nargs="*",
        default=[0.8, 0.5],
        help="also report uniform pruning's perplexity at these shares of parameters kept",
    )
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)

    model = adapter.load_model(args.model, torch.device("cpu"))
    tokenizer = adapter.load_tokenizer(args.model)
    evaluation = token_windows(tokenizer, read_text(args.evaluation), args.seq_len, args.windows)
    calibration = token_windows(tokenizer, read_text(args.calibration), args.seq_len, args.windows)
    spec = adapter.model_spec(model)
    space = SearchSpace(spec, int(Architecture.full(spec).params() * args.budget))
    importance = compute_importance(model, calibration)
    arch = space.random(np.random.default_rng(0))
    bs = args.batch_size

    def plain():
        return perplexity(model, evaluation, bs)

    def masked_eval():
        with masked(model, arch, importance):
            return perplexity(model, evaluation, bs)

    def view_eval():
        with sliced_view(model, arch, importance):
            return perplexity(model, evaluation, bs)

    sliced = slice_model(copy.deepcopy(model), arch, importance)
    t_plain = timed(plain)
    rows = {
        "importance pass ÷ plain forward": timed(lambda: compute_importance(model, evaluation, batch_size=bs), 1)
        / t_plain,
        "masked evaluation ÷ plain forward": timed(masked_eval) / t_plain,
        "sliced-view evaluation ÷ plain forward": timed(view_eval) / t_plain,
        "sliced model forward ÷ plain forward": timed(lambda: perplexity(sliced, evaluation, bs)) / t_plain,
    }
    size = model_bytes(model)
    rows.update(memory_rows(model, arch, importance, plain, masked_eval))

    print(
        f"model {args.model}: {spec.num_layers} layers, {Architecture.full(spec).params():,} params "
        f"({size / 2**20:.1f} MiB); candidate {arch.params():,} params; "
        f"{args.windows} windows x {args.seq_len} tokens; {torch.get_num_threads()} threads"
    )
    print(
        f"plain forward: {t_plain * 1000:.0f} ms; candidate perplexity {masked_eval():.3f} (masked) "
        f"= {perplexity(sliced, evaluation, bs):.3f} (sliced)"
    )
    print("| measurement | ratio |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.3f} |")
    print(
        f"\n| uniform pruning | params | perplexity |\n|---|---|---|\n| dense | {Architecture.full(spec).params():,} "
        f"| {plain():.3f} |"
    )
    for share in args.uniform:
        uniform = SearchSpace(spec, int(Architecture.full(spec).params() * share)).uniform()
        with masked(model, uniform, importance):
            print(f"| {1 - share:.0%} removed | {uniform.params():,} | {perplexity(model, evaluation, bs):.3f} |")
    return 0


def memory_rows(model, arch, importance, plain, masked_eval) -> dict[str, float]:
    """Extra memory of masked and of sliced-view evaluation, as shares of the model's size."""
    size, spec = model_bytes(model), adapter.model_spec(model)
    base_alloc = allocated_bytes(plain)
    mask_bytes = sum(
        m.numel() * m.element_size()
        for i in range(spec.num_layers)
        for m in unit_masks(arch, importance, i, torch.float32, torch.device("cpu"))
        if m is not None
    )
    return {
        "masked extra memory ÷ model size": (max(allocated_bytes(masked_eval) - base_alloc, 0) + mask_bytes) / size,
        "sliced-view extra memory ÷ model size": view_bytes(arch, next(model.parameters()).element_size()) / size,
    }


if __name__ == "__main__":
    sys.exit(main())
