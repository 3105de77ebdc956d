"""Evidence: our searched architecture against uniform, importance-threshold (FLAP) and Torch-Pruning.

    python -m experiments.compare --removed 20% 35% 50% [--model DIR] [--trials 48] [--out runs/compare]
                                  [-- search.run arguments, e.g. --seq-len 128 --recover-steps 200]

For each share of parameters removed, on the same model, calibration and evaluation text:

- uniform:            the same ratio in every layer (LLM-Pruner's and Torch-Pruning's default), Wanda units;
- threshold:          FLAP's allocation, one global threshold on per-layer standardised fluctuation scores;
- threshold + bias:   the same, with FLAP's bias compensation (`pruning.compensation`);
- Torch-Pruning:      its own LLM recipe (`experiments.torch_pruning_peer`), needs `pip install ".[bench]"`;
- searched:           `python -m search.run` with the default sampler and --trials measured candidates;

each sliced to at most the same parameter count, then given the same LoRA recovery (the
search run's defaults: --recover-steps, rank 8, distillation from the dense model).
Perplexity is measured on the evaluation windows the search never saw (the search measures
candidates on --search-windows of them). Writes results.md, results.json and compare.png to
--out. Finished rows are kept in results.json, so an interrupted run resumes with the same command.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import optuna
import torch

from finetune.evaluate import EvalData
from finetune.recover import recover
from pruning.architecture import Architecture
from pruning.compensation import input_means
from pruning.importance import compute_importance, load_or_compute
from pruning.metrics import perplexity
from pruning.slicing import slice_model
from search import run
from search.budget import BudgetError, parse_budget
from search.config import ConfigError, RunConfig, RunLayout
from search.export import dense_teacher, recovery_settings, text_domains
from search.report import write_atomic
from search.setup import USER_ERRORS, Setup, prepare
from search.space import SearchSpace

METHODS = ("uniform", "threshold", "threshold + bias", "Torch-Pruning", "searched")


@dataclass
class Row:
    removed: str  # share of parameters removed, as asked ("35%")
    method: str
    params: int  # counted on the pruned model
    pruned: float  # perplexity before recovery
    recovered: float  # after the same LoRA recovery
    seconds: float  # to choose and cut the architecture (for "searched": its trials, first start to last end)
    measured: int  # candidates whose perplexity was measured to choose it
    note: str = ""


@dataclass
class Context:
    """What every method of one model shares."""

    setup: Setup
    held_out: torch.Tensor  # (N, T) evaluation windows no search trial was measured on
    recovery: dict  # keyword arguments of finetune.recover for every method
    measured: dict = field(default_factory=dict)  # name -> (result, seconds): one calibration pass each

    def once(self, name: str, compute):
        """`compute()` and its seconds, run on the first call only: the scores serve every budget."""
        if name not in self.measured:
            self.measured[name] = timed(compute)
        return self.measured[name]


def held_out_windows(setup: Setup) -> torch.Tensor:
    final, search = setup.final_windows, setup.search_windows
    seen = (final[:, None, :] == search[None, :, :]).all(-1).any(-1)  # (N,) rows the search measured
    return final[~seen]


def build_context(config: RunConfig) -> Context:
    setup = prepare(config)
    tokenizer, model = setup.tokenizer, setup.model
    domains = text_domains(config, tokenizer)
    reference = dense_teacher(model, config, domains)
    held_out = held_out_windows(setup)
    recovery = dict(domains=domains, config=recovery_settings(config), evaluation=EvalData(held_out),
                    reference=reference)
    return Context(setup, held_out, recovery)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_arguments(args: argparse.Namespace, budget: str) -> list[str]:
    return ["--model", args.model, "--trials", str(args.trials), *args.search_args, "--budget", budget]


def run_config(argv: list[str]) -> RunConfig:
    """The RunConfig `python -m search.run` would make of `argv`: one source for data, windows and recovery."""
    ns = run.build_parser().parse_args(argv)
    return RunConfig(**{f.name: getattr(ns, f.name) for f in fields(RunConfig)})


def search_run(argv: list[str], removed: str, out: Path) -> RunLayout:
    """Run (or resume) the search for this budget; its best architecture is in the run directory."""
    layout = RunLayout(out / f"search-removed-{removed.rstrip('%')}pct")
    argv = [*argv, "--no-export", "--out", str(layout.root)]
    with redirect_stdout(sys.stderr):
        if run.main(argv) != 0:
            raise SystemExit(f"the search for {removed} removed failed; see above")
    return layout


def search_seconds(summary: dict) -> float:
    """First trial's start to last trial's end: the search's cost, also when a finished run was reopened."""
    study = optuna.load_study(study_name=summary["study_name"], storage=summary["storage"])
    trials = [t for t in study.trials if t.datetime_complete is not None]
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()


def prune_method(method: str, ctx: Context, space: SearchSpace, layout: RunLayout):
    """(pruned copy of the dense model, seconds, measured candidates, note) for one method."""
    setup = ctx.setup
    dense, calibration, batch = setup.model, setup.calibration, setup.config.batch_size
    if method == "searched":
        summary = json.loads(layout.summary_json.read_text())
        arch = Architecture.from_json(layout.best_architecture.read_text())
        scores = load_or_compute(dense, calibration, setup.config.importance, layout.root, batch)  # the search's
        return (slice_model(copy.deepcopy(dense), arch, scores), search_seconds(summary),
                summary["trials_complete"], f"best of {summary['trials_complete']} trials")
    if method == "Torch-Pruning":
        from experiments.torch_pruning_peer import prune_to_params

        (model, ratio, head_ratio), seconds = timed(lambda: prune_to_params(dense, space.budget))
        return model, seconds, 0, f"width ratio {ratio:.3f}, head ratio {head_ratio:.3f}"
    scores = "wanda" if method == "uniform" else "fluctuation"
    importance, seconds = ctx.once(scores, lambda: compute_importance(dense, calibration, scores, batch))
    means = None
    if method == "threshold + bias":
        means, extra = ctx.once("means", lambda: input_means(dense, calibration, batch))
        seconds += extra
        # The biases cost parameters too: leave room for one per o_proj and down_proj output.
        spec = space.spec
        space = replace(space, budget=space.budget - 2 * spec.num_layers * spec.hidden_size)
    arch = space.uniform() if method == "uniform" else space.threshold(importance)
    return slice_model(copy.deepcopy(dense), arch, importance, means), seconds, 0, f"{scores} scores"


def measure(method: str, removed: str, ctx: Context, space: SearchSpace, layout: RunLayout) -> Row:
    model, seconds, measured, note = prune_method(method, ctx, space, layout)
    params = sum(p.numel() for p in model.parameters())
    if params > space.budget:
        raise AssertionError(f"{method} kept {params:,} parameters, over the budget {space.budget:,}")
    model, result = recover(model, **ctx.recovery)
    return Row(removed, method, params, result.before.perplexity, result.after.perplexity, round(seconds, 1),
               measured, note)


# ---------------------------------------------------------------------------------------- report


def table(rows: list[Row], dense_ppl: float, dense_params: int) -> str:
    uniform = {r.removed: r for r in rows if r.method == "uniform"}

    def versus(r: Row, column: str) -> str:
        u = uniform.get(r.removed)
        return f"{getattr(r, column) / getattr(u, column) - 1:+.0%}" if u and r.method != "uniform" else ""

    lines = [
        f"Dense model: {dense_params:,} parameters, perplexity {dense_ppl:.2f}.",
        "",
        "| removed | method | parameters | perplexity | vs uniform | + LoRA | vs uniform | seconds | measured | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        if math.isnan(r.pruned):
            lines.append(f"| {r.removed} | {r.method} | | | | | | | | {r.note} |")
            continue
        lines.append(
            f"| {r.removed} | {r.method} | {r.params:,} | {r.pruned:.2f} | {versus(r, 'pruned')} | {r.recovered:.2f} "
            f"| {versus(r, 'recovered')} | {r.seconds:.1f} | {r.measured} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], dense_ppl: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, column, label in zip(axes, ("pruned", "recovered"), ("after pruning", "after the same LoRA recovery"),
                                strict=True):
        for method in METHODS:
            points = sorted((r.params / 1e6, getattr(r, column)) for r in rows
                            if r.method == method and not math.isnan(r.pruned))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=method)
        ax.axhline(dense_ppl, color="grey", linestyle="--", linewidth=1, label="dense")
        ax.set(title=label, xlabel="parameters (millions)", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("held-out perplexity (log scale)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--removed", nargs="+", default=["20%", "35%", "50%"], help="shares of parameters to remove")
    p.add_argument("--model", default=d.model, help="(default: the shipped reference model)")
    p.add_argument("--trials", type=int, default=48, help="candidates the search measures (default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out", default="runs/compare")
    p.add_argument("search_args", nargs=argparse.REMAINDER,
                   help="after --: python -m search.run arguments, shared by every method (data, windows, recovery)")
    return p


def kept_budget(removed: str) -> str:
    share = removed.strip().rstrip("%")
    try:
        value = float(share)
    except ValueError:
        raise BudgetError(f"--removed takes shares like 35%, got {removed!r}") from None
    if not 0 < value < 100:
        raise BudgetError(f"--removed must be between 0% and 100%, got {removed!r}")
    return f"{100 - value:g}%"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.search_args = [a for a in args.search_args if a != "--"]
    out = Path(args.out)
    results_path = out / "results.json"
    try:
        budgets = [kept_budget(r) for r in args.removed]
        base = run_config(run_arguments(args, budgets[0]))
        settings = json.loads(json.dumps({k: v for k, v in asdict(base).items() if k not in ("budget", "out")}))
        if "Torch-Pruning" in args.methods:
            import torch_pruning  # noqa: F401  (fail now, not after an hour)
        saved = json.loads(results_path.read_text()) if results_path.exists() else {"settings": settings, "rows": []}
        if saved["settings"] != settings:
            raise ConfigError(f"{out} holds results made with other settings ({saved['settings']}); "
                             f"choose another --out")
        ctx = build_context(base)
    except ImportError as err:
        if err.name != "torch_pruning":
            raise
        print('error: Torch-Pruning is not installed; pip install ".[bench]" or leave it out of --methods',
              file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = [Row(**r) for r in saved["rows"]]
    done = {(r.removed, r.method) for r in rows}
    dense_params = Architecture.full(ctx.setup.space.spec).params()
    for removed, budget in zip(args.removed, budgets, strict=True):
        space = replace(ctx.setup.space, budget=parse_budget(budget, dense_params))
        layout = search_run(run_arguments(args, budget), removed, out) if "searched" in args.methods else None
        for method in args.methods:
            if (removed, method) in done:
                continue
            print(f"[compare] {removed} removed: {method}", file=sys.stderr)
            try:
                rows.append(measure(method, removed, ctx, space, layout))
            except Exception as err:  # a peer that breaks on this model is a result too; ours breaking is a bug
                if method != "Torch-Pruning":
                    raise
                print(f"[compare] {method} failed: {err!r}", file=sys.stderr)
                rows.append(Row(removed, method, 0, math.nan, math.nan, 0.0, 0, f"failed: {err}"[:160]))
            write_atomic(results_path, json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]},
                                                  indent=1))
    order = {(r, m): i for i, (r, m) in enumerate((r, m) for r in args.removed for m in METHODS)}
    rows = sorted((r for r in rows if (r.removed, r.method) in order), key=lambda r: order[r.removed, r.method])
    dense_ppl = perplexity(ctx.setup.model, ctx.held_out, base.batch_size)
    text = table(rows, dense_ppl, dense_params)
    write_atomic(out / "results.md", text)
    plot(rows, dense_ppl, out / "compare.png", f"{Path(args.model).name}: perplexity vs parameters")
    print(text)
    print(f"table: {out / 'results.md'}\nplot:  {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
