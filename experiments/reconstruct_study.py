"""What reconstruction (`pruning.reconstruct`) buys, what it costs, and how to use it, on the searches of a compare run.

    python -m experiments.reconstruct_study --compare runs/compare [--damps 1e-5 1e-4 1e-3 1e-2 1e-1] [--top 4]

For every search run under --compare (`experiments.compare` writes them; each is one budget and seed):

1. target and damping: the best architecture re-fitted (to the dense output plus drift, and to its own
   stream) at each --damps value, measured on the search windows (what the
   default is chosen on) and on the held-out windows (reported only);
2. units: the same architecture keeping units chosen by Wanda scores (the search's) or by their OBS
   saliency ||W[:, c]||^2 / [C^-1]_cc (the error a least-squares re-fit cannot undo when c alone goes, as in
   SlimGPT / ZipLM), both re-fitted;
3. scoring after reconstruction: the search's --top best candidates re-fitted and re-ranked on the search windows;
   the one chosen that way against the search's own best, both re-fitted, on the held-out windows;
4. cost: seconds of one re-fit against one trial (the search windows' perplexity of one candidate), and the
   re-fit's extra memory bound against the model's weights.

Writes results.md and results.json to --out (default: <compare>/reconstruct-study).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import torch

from experiments import provenance
from pruning import adapter
from pruning.architecture import Architecture
from pruning.importance import Importance, load_or_compute
from pruning.masking import masked
from pruning.metrics import perplexity
from pruning.reconstruct import TARGETS, ReconstructionConfig, reconstructed
from search.config import RunConfig
from search.setup import prepare
from search.trials import measurements


def obs_importance(model, windows: torch.Tensor, like: Importance, batch_size: int) -> Importance:
    """Per input channel of o_proj / down_proj, ||W[:, c]||^2 / [C^-1]_cc on the dense model (C = sum x x^T,
    damped by 1% of its mean diagonal); heads sum their channels."""
    parts = [adapter.layer_parts(layer) for layer in adapter.decoder_layers(model)]
    covs = {(i, k): torch.zeros(p.in_features, p.in_features, dtype=torch.float64)
            for i, part in enumerate(parts) for k, p in (("o", part.o), ("down", part.down))}

    def hook(key):
        def gather(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            covs[key].addmm_(x.T, x)
        return gather

    handles = [p.register_forward_pre_hook(hook((i, k))) for i, part in enumerate(parts)
               for k, p in (("o", part.o), ("down", part.down))]
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start : start + batch_size])
    for h in handles:
        h.remove()

    def saliency(i, key, proj):
        c = covs[i, key]
        c.diagonal().add_(0.01 * c.diagonal().mean())
        return (proj.weight.detach().double().square().sum(0) / torch.linalg.inv(c).diagonal()).numpy()

    spec = like.spec
    heads = tuple(saliency(i, "o", p.o).reshape(spec.num_kv_heads, spec.group_size, spec.head_dim).sum(-1)
                  for i, p in enumerate(parts))
    return Importance(spec, "obs", heads, tuple(saliency(i, "down", p.down) for i, p in enumerate(parts)))


def refit_perplexity(model, arch, importance, calibration, windows: dict, settings: ReconstructionConfig) -> dict:
    """{name: perplexity on windows[name]} of `arch` re-fitted once with `settings`, and its "seconds"."""
    started = time.perf_counter()
    with reconstructed(model, arch, importance, calibration, settings):
        row = {"seconds": time.perf_counter() - started}
        row.update({name: perplexity(model, w, settings.batch_size) for name, w in windows.items()})
    return row


def memory_bound(spec, windows: int, seq_len: int, bytes_per: int = 4) -> tuple[int, int]:
    """(extra bytes the re-fit holds at most, the model's weight bytes): three caches of the layer inputs (the
    pruned stream, the dense stream and its mid-layer residual), and for the widest projection (every input kept,
    the worst case) its float32 Gram matrix and float64 copy, and its float32 cross term (k, out)."""
    width, hidden = max(spec.num_heads * spec.head_dim, spec.intermediate_size), spec.hidden_size
    caches = 3 * windows * seq_len * hidden * bytes_per
    statistics = width * width * (4 + 8) + width * hidden * 4
    return caches + statistics, Architecture.full(spec).params() * bytes_per


def study_run(run_dir: Path, damps: list[float], top: int, loaded: dict) -> dict:
    config = RunConfig(**json.loads((run_dir / "run.json").read_text()))
    key = (config.model, config.calibration, config.evaluation, config.seq_len, config.search_windows)
    if key not in loaded:
        loaded[key] = prepare(replace(config, out=str(run_dir)))
    setup = loaded[key]
    model, batch, search, held = setup.model, config.batch_size, setup.search_windows, setup.held_out_windows
    importance = load_or_compute(model, setup.calibration, config.importance, run_dir, batch)
    summary = json.loads((run_dir / "summary.json").read_text())
    study = optuna.load_study(study_name=summary["study_name"], storage=summary["storage"])
    ranked = sorted((m for m in measurements(study) if m.ok), key=lambda m: m.value)
    best = ranked[0].architecture
    row = {"run": run_dir.name, "params": best.params()}
    started = time.perf_counter()
    with masked(model, best, importance):
        row["raw search"], row["trial seconds"] = perplexity(model, search, batch), time.perf_counter() - started
        row["raw held-out"] = perplexity(model, held, batch)
    both = {"search": search, "held-out": held}
    for target in TARGETS:
        for damp in damps:
            fit = refit_perplexity(model, best, importance, setup.calibration, both,
                                   ReconstructionConfig(damp=damp, batch_size=batch, target=target))
            row.update({f"{name} {target} damp {damp:g}": fit[name] for name in both})
            row.setdefault(f"refit seconds {target}", fit["seconds"])
    default = ReconstructionConfig(batch_size=batch)
    obs = obs_importance(model, setup.calibration, importance, batch)
    for name, scores in (("wanda", importance), ("obs", obs)):
        fit = refit_perplexity(model, best, scores, setup.calibration, both, default)
        row.update({f"units {name} {window}": fit[window] for window in both})
    candidates = [m.architecture for m in ranked[:top]]
    rescored = [refit_perplexity(model, a, importance, setup.calibration, {"search": search}, default)["search"]
                for a in candidates]
    chosen = int(np.argmin(rescored))
    row["top-k chosen rank"] = chosen
    row["top-k chosen held-out"] = refit_perplexity(model, candidates[chosen], importance, setup.calibration,
                                                    {"held-out": held}, default)["held-out"]
    row["top-k extra windows"] = top * len(search)
    extra, weights = memory_bound(setup.space.spec, min(32, len(setup.calibration)), config.seq_len)
    row["memory share"] = extra / weights
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.reconstruct_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", required=True, help="an experiments.compare output directory")
    p.add_argument("--damps", nargs="+", type=float, default=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument("--top", type=int, default=4, help="candidates re-fitted and re-ranked (default: %(default)s)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    runs = sorted(d for d in Path(args.compare).glob("search-*") if (d / "summary.json").exists())
    if not runs:
        print(f"error: no finished search runs under {args.compare}; run experiments.compare first", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.compare) / "reconstruct-study")
    out.mkdir(parents=True, exist_ok=True)
    loaded, rows = {}, []
    for run_dir in runs:
        rows.append(study_run(run_dir, args.damps, args.top, loaded))
        print(rows[-1], file=sys.stderr)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    frame = pd.DataFrame(rows).set_index("run").T
    search_means = {(t, d): np.mean([r[f"search {t} damp {d:g}"] for r in rows]) for t in TARGETS for d in args.damps}
    text = (f"Reconstruction study over {len(rows)} search runs of `{args.compare}`; command: "
            f"`python -m experiments.reconstruct_study {' '.join(argv or sys.argv[1:])}`\n\n"
            f"Target and damping with the lowest mean search-window perplexity: "
            f"{' '.join(map(str, min(search_means, key=search_means.get)))} "
            f"(means: {', '.join(f'{t} {d:g}: {v:.3f}' for (t, d), v in search_means.items())}).\n\n"
            f"{frame.to_markdown(floatfmt='.4g')}\n")
    (out / "results.md").write_text(provenance.header("experiments.reconstruct_study", argv) + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
