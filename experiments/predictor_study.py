"""How well does each predictor rank candidates it has not measured, from n = 10, 20, 40 pairs?

    python -m experiments.predictor_study [--budget 0.6] [--pool 96] [--seeds 5] [--out runs/predictor_study]

1. Load the reference model (CPU), wanda importance from calibration windows, evaluation windows.
2. Build a pool of candidates at one budget with search.space: the uniform allocation, the
   importance-threshold allocation of each importance method, mutations of both, and random
   per-layer allocations (sublayers dropped with probability 0.1).
3. Measure every candidate's perplexity with `masked` + `perplexity` (cached in a CSV in --out,
   keyed by model, importance and evaluation windows, so a rerun only measures what is new).
4. For each seed: hold out the same `pool - max(n)` candidates, fit every predictor on the first
   n of a shuffled remainder, and score its ranking of the held-out ones (Kendall tau, Spearman
   rho, top-5 recall/overlap, relative error). Writes results.csv, summary.csv and summary.md.
5. With --sensitivity-windows N (default 4): the same again on tables that carry the sensitivity
   table's additive estimate (`FeatureBuilder(importance, table)`, rows "<name> +additive"), and
   the additive estimate alone ("additive"): what the database's feature adds to each predictor.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from experiments import provenance
from predictor.base import Predictor
from predictor.baselines import AdditiveBaseline, ForestBaseline, MassProxy, RidgeBaseline
from predictor.features import FeatureBuilder
from predictor.model import ObjectivePredictor
from predictor.validate import evaluate_holdout
from pruning import adapter, reference
from pruning.architecture import Architecture
from pruning.data import evenly_spaced, read_text, token_windows
from pruning.importance import METHODS, Importance, cache_key, load_or_compute
from pruning.masking import masked
from pruning.metrics import perplexity
from pruning.sensitivity import Grid, measure_sensitivity
from search.space import SearchSpace

PREDICTORS: dict[str, Callable[[int], Predictor]] = {
    "xgboost": lambda seed: ObjectivePredictor(n_members=8, seed=seed),
    "proxy:mass_total": lambda seed: MassProxy("mass_total"),
    "proxy:mass_mean": lambda seed: MassProxy("mass_mean"),
    "ridge": lambda seed: RidgeBaseline(),
    "random_forest": lambda seed: ForestBaseline(seed=seed),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(reference.MODEL_DIR))
    p.add_argument("--calibration", default=str(reference.CALIBRATION_TEXT))
    p.add_argument("--evaluation", default=str(reference.EVALUATION_TEXT))
    p.add_argument("--budget", type=float, default=0.6, help="share of the model's parameters to keep")
    p.add_argument("--pool", type=int, default=96, help="candidates to measure")
    p.add_argument("--seeds", type=int, default=5, help="train/held-out splits per n")
    p.add_argument("--pool-seed", type=int, default=0, help="seed of the random and mutated candidates")
    p.add_argument("--n-train", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calibration-windows", type=int, default=64)
    p.add_argument("--evaluation-windows", type=int, default=32)
    p.add_argument("--sensitivity-windows", type=int, default=4,
                   help="evaluation windows of the sensitivity table for the +additive rows; 0: none")
    p.add_argument("--out", default="runs/predictor_study")
    return p.parse_args(argv)


def candidate_pool(space: SearchSpace, importances: dict[str, Importance], size: int,
                   seed: int = 0) -> list[tuple[str, Architecture]]:
    """(source, architecture) pairs without duplicates: uniform, thresholds, mutations of both, random."""
    rng = np.random.default_rng(seed)
    uniform = space.uniform()
    pool = {uniform: "uniform"}
    for method, imp in importances.items():
        pool.setdefault(space.threshold(imp), f"threshold:{method}")
    anchors = list(pool)
    for i in range(size // 6):
        pool.setdefault(space.mutate(anchors[i % len(anchors)], rng), f"mutation:{pool[anchors[i % len(anchors)]]}")
    while len(pool) < size:
        pool.setdefault(space.random(rng), "random")
    return [(source, arch) for arch, source in pool.items()]


def measure(model, importance: Importance, pool: list[tuple[str, Architecture]], windows: torch.Tensor,
            cache: Path) -> pd.DataFrame:
    """One row per candidate: source, arch (JSON), params, perplexity, seconds; rows in `cache` are reused."""
    known = set(pd.read_csv(cache)["arch"]) if cache.exists() else set()
    for source, arch in tqdm([(s, a) for s, a in pool if a.to_json() not in known], desc="measure"):
        start = time.perf_counter()
        with masked(model, arch, importance):
            ppl = perplexity(model, windows)
        row = {"source": source, "arch": arch.to_json(), "params": arch.params(), "perplexity": ppl,
               "seconds": time.perf_counter() - start}
        pd.DataFrame([row]).to_csv(cache, mode="a", header=not cache.exists(), index=False)
    done = pd.read_csv(cache).drop_duplicates("arch").set_index("arch")
    return done.loc[[a.to_json() for _, a in pool]].reset_index()


def study(table: pd.DataFrame, metrics: np.ndarray, n_train: list[int], seeds: int, top_k: int,
          predictors: dict[str, Callable[[int], Predictor]] = PREDICTORS) -> pd.DataFrame:
    """One row per (seed, n, predictor): its ranking of the candidates held out for that seed."""
    finite = np.flatnonzero(np.isfinite(metrics))
    held = len(finite) - max(n_train)
    if held < 2 * top_k:
        raise ValueError(f"only {len(finite)} finite measurements; need at least {max(n_train) + 2 * top_k}")
    records = []
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(finite)
        test = order[max(n_train):]
        for n in n_train:
            train = order[:n]
            for name, make in predictors.items():
                report = evaluate_holdout(lambda make=make, seed=seed: make(seed), table.iloc[train], metrics[train],
                                          table.iloc[test], metrics[test], top_k)
                records.append({"seed": seed, "n": n, **report.to_dict(), "predictor": name})
    return pd.DataFrame(records)


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    cols = ["kendall", "spearman", "top_k_recall", "top_k_overlap", "mape"]
    grouped = results.groupby(["n", "predictor"], sort=False)[cols]
    mean, std = grouped.mean(), grouped.std(ddof=0)
    out = mean.copy()
    for c in ("kendall", "spearman"):
        out[f"{c}_std"] = std[c]
    return out.reset_index()


def markdown(summary: pd.DataFrame) -> str:
    lines = ["| n | predictor | Kendall τ | Spearman ρ | top-5 recall | top-5 overlap | MAPE |",
             "|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.n} | {r.predictor} | {r.kendall:.3f} ± {r.kendall_std:.3f} | "
                     f"{r.spearman:.3f} ± {r.spearman_std:.3f} | {r.top_k_recall:.2f} | {r.top_k_overlap:.2f} | "
                     f"{r.mape:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = adapter.load_model(args.model, device)
    tokenizer = adapter.load_tokenizer(args.model)
    calibration = token_windows(tokenizer, read_text(args.calibration), args.seq_len, args.calibration_windows)
    evaluation = token_windows(tokenizer, read_text(args.evaluation), args.seq_len, args.evaluation_windows)
    importances = {m: load_or_compute(model, calibration, m, out / "importance") for m in METHODS}
    importance = importances["wanda"]
    full = Architecture.full(importance.spec)
    space = SearchSpace(importance.spec, budget=int(args.budget * full.params()))
    pool = candidate_pool(space, importances, args.pool, args.pool_seed)

    key = hashlib.sha256(cache_key(model, calibration, "wanda").encode())  # which units; then the eval tokens
    key.update(evaluation.numpy().tobytes())
    start = time.perf_counter()
    dense = perplexity(model, evaluation)
    measured = measure(model, importance, pool, evaluation, out / f"measurements-{key.hexdigest()[:12]}.csv")
    print(f"dense perplexity {dense:.3f}; {len(measured)} candidates at {args.budget:.0%} of "
          f"{full.params():,} parameters measured in {time.perf_counter() - start:.0f}s")
    print(measured.groupby("source", sort=False)["perplexity"].describe()[["count", "min", "50%", "max"]])

    archs = [Architecture.from_json(a) for a in measured["arch"]]
    metrics = measured["perplexity"].to_numpy(dtype=np.float64)
    results = study(FeatureBuilder(importance).table(archs), metrics, args.n_train, args.seeds, args.top_k)
    if args.sensitivity_windows:
        picked = evenly_spaced(len(evaluation), args.sensitivity_windows)
        sensitivity = measure_sensitivity(model, importance, evaluation[picked], Grid.spread(importance.spec),
                                          ("nll",), cache_dir=out)
        additive = {f"{name} +additive": make for name, make in PREDICTORS.items() if not name.startswith("proxy")}
        additive["additive"] = lambda seed: AdditiveBaseline()
        table = FeatureBuilder(importance, sensitivity).table(archs)
        results = pd.concat([results, study(table, metrics, args.n_train, args.seeds, args.top_k, additive)])
    summary = summarise(results)
    results.to_csv(out / "results.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    text = markdown(summary)
    (out / "summary.md").write_text(provenance.header("experiments.predictor_study", argv) + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
