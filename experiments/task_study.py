"""Accuracy, not only perplexity: does searching by the task pay off after task LoRA, and how do objectives rank?

    python -m experiments.task_study [--budgets 80% 50%] [--trials 16] [--steps 60] [--candidates 36]
                                     [--out runs/task_study] [--results experiments/results/task-study.md]

On the shipped reference model and the shipped next-line task (`finetune.next_line`):

1. Tailored-LLaMA replication. For each budget (parameters kept, embeddings included), three prunings
   get the same task LoRA (calibration text + the task's training examples rendered with its prompt
   and one few-shot example, `finetune`): (a) the best of a perplexity search, (b) the best of a task
   search (accuracy on the search examples, predictor on the margin), (c) uniform pruning. Reported:
   task accuracy on the held-out 20% of the task (no search or recovery choice is made on it) as a
   share of the dense model's on the same examples.
2. Objectives compared on `--candidates` candidates at `--study-budget` (uniform, importance threshold,
   mutations of both and random allocations), each measured by every
   objective on the search split: predictor Kendall tau on held-out candidates (5-fold: fit the
   XGBoost predictor on 4/5, rank the rest) for perplexity, KL, task accuracy and the margin; how
   consistently perplexity and KL rank candidates across 4 disjoint window subsets (mean Kendall
   tau over the 6 pairs of subsets); and the wall time per trial of each objective, lm-eval on a
   local YAML of the same task included, as a ratio to perplexity's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from experiments import provenance
from finetune import next_line
from predictor.features import FeatureBuilder
from predictor.model import ObjectivePredictor
from pruning.importance import load_or_compute
from pruning.masking import masked
from pruning.metrics import window_losses
from search.config import RunConfig
from search.objectives import KL, LMEval, Perplexity
from search.objectives.harness import Suite
from search.objectives.kl import dense_top_k, kl_per_position
from search.objectives.task import read_task
from search.pipeline import run_search
from search.recovery import recover_and_export
from search.setup import prepare
from search.trials import to_loss

FOLDS = 5
SUBSETS = 4


def base_config(args, budget: str, out: Path, **overrides) -> RunConfig:
    task = dict(task=str(next_line.TASK_PATH), task_template=next_line.TEMPLATE,
                task_answer_prefix=next_line.ANSWER_PREFIX, shots=1, task_search_examples=args.search_examples)
    recovery = dict(recover_steps=args.steps, recover_windows=args.recover_windows, distill=0.0)
    return RunConfig(budget=budget, trials=args.trials, search_windows=args.search_windows, n_startup=6,
                     out=str(out), seed=args.seed, **task, **recovery, **overrides)


def held_out_accuracy(record) -> dict[str, float]:
    return {"dense": record.dense["task_accuracy"], "pruned": record.pruned["task_accuracy"],
            "recovered": record.final["task_accuracy"], "kept step": record.selected_step}


def replication(args, out: Path) -> list[dict]:
    rows = []
    for budget in args.budgets:
        tag = budget.replace("%", "pct")
        for method, overrides in (("perplexity search", {}),
                                  ("task search", dict(objective="task", predictor_target="margin"))):
            started = time.time()
            summary = run_search(base_config(args, budget, out / f"{tag}-{method.split()[0]}", **overrides),
                                 command=f"python -m experiments.task_study --budgets {budget}")
            rows.append(dict(budget=budget, method=method, params=summary.best_params,
                             seconds=round(time.time() - started), **held_out_accuracy(summary.recovery)))
            print(json.dumps(rows[-1]), file=sys.stderr)
        started = time.time()
        config = base_config(args, budget, out / f"{tag}-uniform")
        setup = prepare(config)
        setup.layout.root.mkdir(parents=True, exist_ok=True)
        importance = load_or_compute(setup.model, setup.calibration, config.importance, setup.layout.root,
                                     config.batch_size)
        arch = setup.space.uniform()
        record = recover_and_export(setup, importance, arch, setup.layout.root / "model",
                                    "python -m experiments.task_study (uniform)", force=True)
        rows.append(dict(budget=budget, method="uniform", params=arch.params(),
                         seconds=round(time.time() - started), **held_out_accuracy(record)))
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def lm_eval_yaml(root: Path) -> Path:
    """The next-line task as an lm-eval task over the shipped JSONL (offline)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "next_line.yaml").write_text(
        "task: next_line\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {next_line.TASK_PATH}\n"
        "test_split: test\noutput_type: multiple_choice\ntarget_delimiter: \"\\n\"\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{options}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return root


def objectives_study(args, out: Path) -> dict:
    config = base_config(args, args.study_budget, out / "objectives", objective="task", export=False)
    setup = prepare(config)
    setup.layout.root.mkdir(parents=True, exist_ok=True)
    model, windows = setup.model, setup.search_windows
    importance = load_or_compute(model, setup.calibration, config.importance, setup.layout.root, config.batch_size)
    task = setup.objective("search")
    dense = dense_top_k(model, windows, batch_size=config.batch_size)
    archs = candidate_pool(setup.space, importance, args.candidates, args.seed)
    nll, kl, acc, margin = [], [], [], []
    for i, arch in enumerate(archs):
        with masked(model, arch, importance):
            nll.append(window_losses(model, windows, config.batch_size)["nll"])  # (N,)
            kl.append(kl_per_position(model, windows, dense, config.batch_size).mean(1).numpy())  # (N,)
            score = task(model)
        acc.append(score.value)
        margin.append(score.metrics["margin"])
        print(f"candidate {i + 1}/{len(archs)}: ppl {np.exp(nll[-1].mean()):.2f} kl {kl[-1].mean():.4f} "
              f"acc {acc[-1]:.3f} margin {margin[-1]:.2f}", file=sys.stderr)
    nll, kl = np.array(nll), np.array(kl)  # (C, N)
    losses = {"perplexity": np.exp(nll.mean(1)), "kl": kl.mean(1),
              "task accuracy": np.array([to_loss(a, "maximize") for a in acc]),
              "task margin": np.array([to_loss(m, "maximize") for m in margin])}
    features = FeatureBuilder(importance).table(archs)
    taus = {name: predictor_tau(features, y, args.seed) for name, y in losses.items()}
    subsets = np.array_split(np.arange(windows.shape[0]), SUBSETS)
    consistency = {
        "perplexity": subset_agreement([np.exp(nll[:, s].mean(1)) for s in subsets]),
        "kl": subset_agreement([kl[:, s].mean(1) for s in subsets]),
    }
    return {"candidates": len(archs), "budget": args.study_budget, "tau": taus, "consistency": consistency,
            "cost": costs(args, setup, importance, archs[: args.timed], dense),
            "spread": {"accuracy": [float(min(acc)), float(max(acc))], "distinct accuracies": len(set(acc))}}


def candidate_pool(space, importance, n: int, seed: int) -> list:
    """Uniform, importance threshold, then chains of mutations of both (two thirds) and random allocations
    with nothing dropped (a third): candidates a search would meet, not only far-off random ones."""
    rng = np.random.default_rng(seed)
    pool, keys = [space.uniform(), space.threshold(importance)], set()
    while len(pool) < n:
        if rng.random() < 2 / 3:
            arch = pool[rng.integers(min(len(pool), 2))]
            for _ in range(rng.integers(1, 4)):
                arch = space.mutate(arch, rng)
        else:
            arch = space.random(rng, drop_prob=0.0)
        if arch.to_json() not in keys:
            keys.add(arch.to_json())
            pool.append(arch)
    return pool


def predictor_tau(features, y: np.ndarray, seed: int) -> float:
    """Mean Kendall tau of the XGBoost predictor's ranking of held-out candidates over FOLDS folds."""
    order = np.random.default_rng(seed).permutation(len(y))
    taus = []
    for fold in np.array_split(order, FOLDS):
        train = np.setdiff1d(order, fold)
        predictor = ObjectivePredictor(seed=seed).fit(features.iloc[train], y[train])
        predicted, _ = predictor.predict(features.iloc[fold])
        taus.append(kendalltau(predicted, y[fold]).statistic)
    return float(np.nanmean(taus))


def subset_agreement(values: list[np.ndarray]) -> float:
    """Mean Kendall tau between the candidate rankings that each pair of window subsets gives."""
    return float(np.mean([kendalltau(a, b).statistic for a, b in itertools.combinations(values, 2)]))


def costs(args, setup, importance, archs, dense) -> dict[str, float]:
    """Seconds per trial (mask + objective call) of each objective, on the same search split."""
    config, model = setup.config, setup.model
    objectives = {"perplexity": Perplexity(setup.search_windows, config.batch_size),
                  "kl": KL(setup.search_windows, dense, config.batch_size), "task": setup.objective("search")}
    try:
        suite = Suite.load("lm-eval:next_line", str(lm_eval_yaml(Path(args.out) / "lm_eval_tasks")))
        objectives["lm-eval:next_line"] = LMEval.build(suite, model, setup.tokenizer, config.batch_size,
                                                       config.task_search_examples, "search")
    except Exception as err:  # lm-eval not installed: report the others
        print(f"lm-eval skipped: {err}", file=sys.stderr)
    seconds = {}
    for name, objective in objectives.items():
        objective(model)  # warm-up (lm-eval builds its requests on the first call)
        started = time.perf_counter()
        for arch in archs:
            with masked(model, arch, importance):
                objective(model)
        seconds[name] = (time.perf_counter() - started) / len(archs)
    return {name: s / seconds["perplexity"] for name, s in seconds.items()} | {
        f"{name} s": round(s, 3) for name, s in seconds.items()}


def held_out_examples() -> int:
    """How many examples of the shipped task every row's accuracy is measured on (the split's size is seed-free)."""
    _, held_out = read_task(str(next_line.TASK_PATH), next_line.TEMPLATE, next_line.ANSWER_PREFIX, seed=0,
                            need_options=True)
    return len(held_out)


def markdown(args, rows: list[dict], study: dict | None) -> str:
    lines = ["# Task study: searching by the task, and how objectives rank candidates", "",
             "Reference model, shipped next-line task (`finetune.next_line`, 4 options, chance 25%). Accuracy is "
             f"on the task's held-out 20% ({held_out_examples()} examples; no search or recovery choice was made on "
             "them), as a share of the dense model's on the same examples. Searches choose on "
             f"{args.search_windows} search windows (perplexity) or {args.search_examples} search examples "
             f"(task: accuracy, predictor learning the margin) in {args.trials} trials; every pruning then gets "
             f"the same task LoRA ({args.steps} steps, calibration text + task training examples, 1 shot), "
             f"which keeps the step with the best task margin on the {args.search_examples} search examples "
             "(left out of its training; step 0 is the untuned slice).", ""]
    if rows:
        lines += ["| removed | method | params | dense acc | pruned acc | + task LoRA | LoRA step kept "
                  "| share of dense | target |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            removed = 100 - float(r["budget"].rstrip("%"))
            target = 95.7 if removed <= 20 else 86.5
            share = r["recovered"] / r["dense"]
            lines.append(f"| {removed:.0f}% | {r['method']} | {r['params']:,} | {r['dense']:.3f} | "
                         f"{r['pruned']:.3f} | {r['recovered']:.3f} | {r.get('kept step', '')} | {share:.1%} | "
                         f"{'met' if share * 100 >= target else 'missed'} (≥{target}%) |")
        lines.append("")
    if study:
        lines += [f"## Objectives on {study['candidates']} candidates at {study['budget']} kept", "",
                  f"Task accuracy on the search examples spans {study['spread']['accuracy'][0]:.3f}–"
                  f"{study['spread']['accuracy'][1]:.3f} ({study['spread']['distinct accuracies']} distinct values).",
                  "", "| objective | predictor Kendall τ (held-out, 5-fold) |", "|---|---:|"]
        lines += [f"| {name} | {tau:.3f} |" for name, tau in study["tau"].items()]
        lines += ["", f"Ranking consistency across {SUBSETS} disjoint window subsets (mean pairwise Kendall τ): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in study["consistency"].items()) + ".", "",
                  "| objective | seconds per trial | ratio to perplexity |", "|---|---:|---:|"]
        lines += [f"| {name} | {study['cost'][name + ' s']:.3f} | {ratio:.2f}× |"
                  for name, ratio in study["cost"].items() if not name.endswith(" s")]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", default=["80%", "50%"], help="parameters kept")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--steps", type=int, default=60, help="task LoRA steps")
    p.add_argument("--recover-windows", type=int, default=128)
    p.add_argument("--search-windows", type=int, default=32)
    p.add_argument("--search-examples", type=int, default=32)
    p.add_argument("--candidates", type=int, default=36)
    p.add_argument("--study-budget", default="80%", help="parameters kept by the candidates of part 2")
    p.add_argument("--timed", type=int, default=4, help="candidates each objective's cost is timed on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", choices=("replication", "objectives"), help="leave one part out")
    p.add_argument("--out", default="runs/task_study")
    p.add_argument("--results", default="experiments/results/task-study.md")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    out = Path(args.out)
    rows = replication(args, out) if args.skip != "replication" else []
    study = objectives_study(args, out) if args.skip != "objectives" else None
    text = markdown(args, rows, study)
    (out / "results.json").write_text(json.dumps({"rows": rows, "study": study}, indent=2))
    Path(args.results).write_text(provenance.header("experiments.task_study", argv) + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
