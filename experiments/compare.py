"""Evidence: our searched architecture against uniform, LLM-Pruner-style, importance-threshold (FLAP) and
Torch-Pruning.

    python -m experiments.compare --removed 20% 35% 50% [--model DIR] [--trials 48 | --windows 1536]
                                  [--out runs/compare] [-- search.run arguments, e.g. --seq-len 128 --recover-steps 200]

`-- --recover-steps 0` compares before recovery only (the + LoRA columns stay empty).

For each share of parameters removed, on the same model, calibration and evaluation text:

- uniform:            the same ratio in every layer (Torch-Pruning's default), Wanda units;
- LLM-Pruner-style:   LLM-Pruner's recipe: Taylor (first-order) unit scores, the same ratio in every layer but the
                      first 4/32 and the last 2/32 of the depth, which stay whole;
- threshold:          FLAP's allocation, one global threshold on per-layer standardised fluctuation scores;
- threshold + bias:   the same, with FLAP's bias compensation (`pruning.compensation`);
- Torch-Pruning:      its own LLM recipe (`experiments.torch_pruning_peer`), needs `pip install ".[bench]"`;
- sensitivity knapsack: each sublayer measured alone at each of a few sizes (`pruning.sensitivity`, on the
                      search's sensitivity windows), one size per sublayer chosen by a knapsack (`search.knapsack`);
- searched:           `python -m search.run` with the default sampler and --trials measured candidates (or as
                      many as fill --windows evaluation windows after its sensitivity tables), once per
                      --seeds value;

each sliced to at most the same parameter count, then given the same LoRA recovery (the
search run's defaults: --recover-steps, rank 8, distillation from the dense model). With
`--reconstruction both` (the default) every method that yields an architecture is also measured
"+ reconstruction": its kept o_proj / down_proj weights re-fitted on the calibration windows
(`pruning.reconstruct`) before slicing, so the gain of re-fitting is not credited to the allocation
(FLAP's bias compensation and Torch-Pruning's own model are measured as they are).
Perplexity is measured on the evaluation windows the search never saw (the search measures
candidates on --search-windows of them). Writes results.md, results.json and compare.png to
--out. Finished rows are kept in results.json, so an interrupted run resumes with the same command.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from experiments import provenance
from finetune.evaluate import EvalData
from finetune.recover import recover
from pruning.architecture import Architecture
from pruning.compensation import input_means
from pruning.files import write_atomic
from pruning.importance import compute_importance, load_or_compute
from pruning.metrics import perplexity
from pruning.sensitivity import Grid, measure_sensitivity
from pruning.slicing import slice_model
from search.budget import BudgetError, parse_budget
from search.cli_args import parse_config
from search.config import ConfigError, RunConfig
from search.knapsack import knapsack
from search.pipeline import open_run_study, run_search
from search.recovery import dense_teacher, recovery_settings, refit_selected, text_domains
from search.report import RunSummary
from search.runner import table_windows
from search.setup import USER_ERRORS, Setup, prepare
from search.space import SearchSpace
from search.trials import trial_architecture

METHODS = ("uniform", "LLM-Pruner-style", "threshold", "threshold + bias", "Torch-Pruning", "sensitivity knapsack",
           "searched")
# LLM-Pruner's LLaMA-7B recipe prunes layers 4-29 of 32 by Taylor importance, every one by the same ratio, and
# leaves the first 4 and the last 2 whole: the same shares of any model's depth
LLM_PRUNER_WHOLE = (4 / 32, 2 / 32)
NOT_RECONSTRUCTED = ("threshold + bias", "Torch-Pruning")  # their own compensation / their own model
RECONSTRUCTION = {"off": (False,), "on": (True,), "both": (False, True)}


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
    windows: int = 0  # evaluation windows measured to choose it (sensitivity table included)
    seed: int = 0  # the search's seed (other methods are deterministic)
    reconstructed: bool = False  # kept weights re-fitted before slicing (its seconds are in `seconds`)

    @property
    def label(self) -> str:
        name = f"{self.method} (seed {self.seed})" if self.method == "searched" else self.method
        return name + (" + reconstruction" if self.reconstructed else "")


@dataclass
class Context:
    """What every method of one model shares."""

    setup: Setup
    held_out: torch.Tensor  # (N, T) evaluation windows no search trial was measured on
    recovery: dict | None  # keyword arguments of finetune.recover for every method; None: --recover-steps 0
    out: Path  # where results and the sensitivity table's cache go
    measured: dict = field(default_factory=dict)  # name -> (result, seconds): one calibration pass each

    def once(self, name: str, compute):
        """`compute()` and its seconds, run on the first call only: the scores serve every budget."""
        if name not in self.measured:
            self.measured[name] = timed(compute)
        return self.measured[name]


def build_context(config: RunConfig, out: Path) -> Context:
    setup = prepare(config)
    tokenizer, model = setup.tokenizer, setup.model
    domains = text_domains(config, tokenizer)
    reference = dense_teacher(model, config, domains)
    held_out = setup.held_out_windows
    recovery = None if config.recover_steps == 0 else dict(
        domains=domains, config=recovery_settings(config), evaluation=EvalData(held_out), reference=reference,
        validation=EvalData(setup.search_windows))
    return Context(setup, held_out, recovery, out)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_arguments(args: argparse.Namespace, budget: str) -> list[str]:
    return ["--model", args.model, "--trials", str(args.trials), *args.search_args, "--budget", budget]


def run_config(argv: list[str]) -> RunConfig:
    """The RunConfig `python -m search.run` would make of `argv`: one source for data, windows and recovery."""
    return parse_config(argv)


def search_run(argv: list[str], removed: str, seed: int, out: Path, windows: int | None = None) -> RunSummary:
    """Run (or resume) the search for this budget and seed; returns its summary (best architecture included).
    `windows`: the search's cost in evaluation windows (tables included) instead of argv's --trials."""
    run_dir = out / f"search-removed-{removed.rstrip('%')}pct-seed{seed}"
    share_tables(out, run_dir)
    config = run_config([*argv, "--seed", str(seed), "--no-export", "--out", str(run_dir)])
    with redirect_stdout(sys.stderr):
        return run_search(config, windows=windows)


def share_tables(out: Path, run_dir: Path) -> None:
    """Give a run the sensitivity tables already measured under `out` (the rival's, other seeds'). The caches are
    keyed by content (model, windows, scores, grid, base), so a run reads only the tables it would measure itself;
    it still counts their windows as its cost."""
    for path in out.glob("**/sensitivity-*.json"):
        if not (run_dir / path.name).exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, run_dir / path.name)


def search_seconds(summary: RunSummary) -> float:
    """First trial's start to last trial's end: the search's cost, also when a finished run was reopened."""
    trials = [t for t in open_run_study(summary).trials if t.datetime_complete is not None]
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()


def cut(ctx: Context, arch: Architecture, importance, means=None, rebuild: bool = False):
    """(a sliced copy of the dense model, seconds spent re-fitting it, a note on the re-fit); `rebuild`:
    reconstruct before slicing, as the export does (each damping tried, the best on the search windows kept if
    it helps)."""
    model = copy.deepcopy(ctx.setup.model)
    if not rebuild:
        return slice_model(model, arch, importance, means), 0.0, ""
    refit = refit_selected(model, arch, importance, ctx.setup)
    note = (f"; re-fit at damp {refit.damp:g}" if refit.damp
            else "; re-fit not kept (no damping lowered the search windows)")
    return slice_model(model, arch, importance, means), refit.seconds, note


def prune_method(method: str, ctx: Context, space: SearchSpace, summary: RunSummary | None, rebuild: bool = False):
    """(pruned copy of the dense model, seconds, measured candidates, note, windows measured) for one method;
    `rebuild`: its kept weights reconstructed before slicing."""
    setup = ctx.setup
    dense, calibration, batch = setup.model, setup.calibration, setup.config.batch_size
    if method == "searched":
        arch = trial_architecture(open_run_study(summary).trials[summary.best_trial])
        scores = load_or_compute(dense, calibration, setup.config.importance, Path(summary.run_dir), batch)
        model, extra, refit = cut(ctx, arch, scores, rebuild=rebuild)
        return (model, search_seconds(summary) + extra, summary.trials_complete,
                f"best of {summary.trials_complete} trials{refit}", summary.windows_evaluated)
    if method == "Torch-Pruning":
        from experiments.torch_pruning_peer import head_scoring_fails, prune_to_params

        (model, ratio, head_ratio), seconds = timed(lambda: prune_to_params(dense, space.budget))
        heads = ("every head kept (its head scoring fails on this GQA shape)" if head_scoring_fails(dense.config)
                 else f"head ratio {head_ratio:.3f}")
        return model, seconds, 0, f"width ratio {ratio:.3f}, {heads}", 0
    if method == "sensitivity knapsack":
        wanda, _ = ctx.once("wanda", lambda: compute_importance(dense, calibration, "wanda", batch))
        grid = Grid.spread(space.spec, setup.config.sensitivity_points)
        table, seconds = ctx.once("sensitivity", lambda: measure_sensitivity(
            dense, wanda, table_windows(setup), grid, ("nll",), batch, ctx.out))
        windows = table.windows_evaluated()
        model, extra, refit = cut(ctx, knapsack(space, table), wanda, rebuild=rebuild)
        return (model, seconds + extra, table.measurements(),
                f"{table.measurements()} sublayer sizes x {table.windows} windows{refit}", windows)
    scores = {"uniform": "wanda", "LLM-Pruner-style": "taylor"}.get(method, "fluctuation")
    importance, seconds = ctx.once(scores, lambda: compute_importance(dense, calibration, scores, batch))
    means = None
    if method == "threshold + bias":
        means, extra = ctx.once("means", lambda: input_means(dense, calibration, batch))
        seconds += extra
        # The biases cost parameters too: leave room for one per o_proj and down_proj output.
        spec = space.spec
        space = replace(space, budget=space.budget - 2 * spec.num_layers * spec.hidden_size)
    if method == "LLM-Pruner-style":
        arch = space.uniform(*(round(share * space.spec.num_layers) for share in LLM_PRUNER_WHOLE))
    else:
        arch = space.uniform() if method == "uniform" else space.threshold(importance)
    model, extra, refit = cut(ctx, arch, importance, means, rebuild)
    return model, seconds + extra, 0, f"{scores} scores{refit}", 0


def measure(method: str, removed: str, ctx: Context, space: SearchSpace, summary: RunSummary | None,
            seed: int = 0, rebuild: bool = False) -> Row:
    model, seconds, measured, note, windows = prune_method(method, ctx, space, summary, rebuild)
    params = sum(p.numel() for p in model.parameters())
    if params > space.budget:
        raise AssertionError(f"{method} kept {params:,} parameters, over the budget {space.budget:,}")
    if ctx.recovery is None:
        pruned, recovered = perplexity(model, ctx.held_out, ctx.setup.config.batch_size), math.nan
    else:
        model, result = recover(model, **ctx.recovery)
        pruned, recovered = result.before.perplexity, result.after.perplexity
    return Row(removed, method, params, pruned, recovered, round(seconds, 1), measured, note, windows, seed, rebuild)


# ---------------------------------------------------------------------------------------- report


def table(rows: list[Row], dense_ppl: float, dense_params: int) -> str:
    # each row against the rivals re-fitted as it was (or not)
    rivals = {(r.removed, r.method, r.reconstructed): r for r in rows
              if r.method in ("uniform", "sensitivity knapsack")}

    def versus(r: Row, column: str, rival: str) -> str:
        u = rivals.get((r.removed, rival, r.reconstructed))
        if not u or r.method == rival or math.isnan(getattr(r, column)):
            return ""
        return f"{getattr(r, column) / getattr(u, column) - 1:+.1%}"

    lines = [
        f"Dense model: {dense_params:,} parameters, perplexity {dense_ppl:.2f}.",
        "",
        "| removed | method | parameters | perplexity | vs uniform | vs knapsack | + LoRA | vs uniform | vs knapsack "
        "| seconds | measured | windows | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        label = r.label
        if math.isnan(r.pruned):
            lines.append(f"| {r.removed} | {label} | | | | | | | | | | | {r.note} |")
            continue
        recovered = "" if math.isnan(r.recovered) else f"{r.recovered:.2f}"
        lines.append(
            f"| {r.removed} | {label} | {r.params:,} | {r.pruned:.2f} | {versus(r, 'pruned', 'uniform')} "
            f"| {versus(r, 'pruned', 'sensitivity knapsack')} | {recovered} "
            f"| {versus(r, 'recovered', 'uniform')} | {versus(r, 'recovered', 'sensitivity knapsack')} "
            f"| {r.seconds:.1f} | {r.measured} | {r.windows:,} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], dense_ppl: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("pruned", "after pruning"), ("recovered", "after the same LoRA recovery")]
    if all(math.isnan(r.recovered) for r in rows):  # --recover-steps 0: no second panel to leave empty
        panels = panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 2.5, 4.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (column, label) in zip(axes, panels, strict=True):
        for (method, rebuilt), color in zip(((m, b) for b in (False, True) for m in METHODS),
                                            [f"C{i}" for i in range(len(METHODS))] * 2, strict=True):
            points = sorted((r.params / 1e6, getattr(r, column)) for r in rows
                            if (r.method, r.reconstructed) == (method, rebuilt) and not math.isnan(getattr(r, column)))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=color, linestyle="--" if rebuilt else "-",
                        label=method + (" + reconstruction" if rebuilt else ""))
        ax.axhline(dense_ppl, color="grey", linestyle="--", linewidth=1, label="dense")
        ax.set(title=label, xlabel="parameters (millions)", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("held-out perplexity (log scale)")
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def compare_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--removed", nargs="+", default=["20%", "35%", "50%"], help="shares of parameters to remove")
    p.add_argument("--model", default=d.model, help="(default: the shipped reference model)")
    p.add_argument("--trials", type=int, default=48, help="candidates the search measures (default: %(default)s)")
    p.add_argument("--windows", type=int, help="instead of --trials: each search's cost in evaluation windows, its "
                   "sensitivity tables included (48 trials x 32 windows = 1536)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one search per seed (default: %(default)s)")
    p.add_argument("--reconstruction", choices=RECONSTRUCTION, default="both",
                   help="measure each method as cut, re-fitted (pruning.reconstruct), or both (default: %(default)s)")
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
    args = compare_parser().parse_args(argv)
    args.search_args = [a for a in args.search_args if a != "--"]
    out = Path(args.out)
    try:
        budgets = [kept_budget(r) for r in args.removed]
        base = run_config(run_arguments(args, budgets[0]))
        settings = json.loads(json.dumps({k: v for k, v in asdict(base).items() if k not in ("budget", "out")}))
        if args.windows is not None:
            settings["windows"] = args.windows
        if "Torch-Pruning" in args.methods:
            import torch_pruning  # noqa: F401  (fail now, not after an hour)
        rows = saved_rows(out / "results.json", settings)
        ctx = build_context(base, out)
    except ImportError as err:
        if err.name != "torch_pruning":
            raise
        print('error: Torch-Pruning is not installed; pip install ".[bench]" or leave it out of --methods',
              file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    rows = measure_all(args, budgets, ctx, rows, settings)
    report(args, argv, ctx, rows)
    return 0


def saved_rows(path: Path, settings: dict) -> list[Row]:
    """The rows an earlier run with the same settings wrote (the comparison resumes); ConfigError otherwise."""
    saved = json.loads(path.read_text()) if path.exists() else {"settings": settings, "rows": []}
    if saved["settings"] != settings:
        raise ConfigError(f"{path.parent} holds results made with other settings ({saved['settings']}); "
                          f"choose another --out")
    return [Row(**r) for r in saved["rows"]]


def measure_all(args: argparse.Namespace, budgets: list[str], ctx: Context, rows: list[Row], settings: dict
                ) -> list[Row]:
    """Measure every (budget, method, seed, reconstruction) not in `rows` yet, saving the rows after each."""
    done = {(r.removed, r.method, r.seed, r.reconstructed) for r in rows}
    dense_params = Architecture.full(ctx.setup.space.spec).params()
    runs = [(m, seed, rebuild) for m in args.methods for seed in (args.seeds if m == "searched" else [0])
            for rebuild in RECONSTRUCTION[args.reconstruction] if not (rebuild and m in NOT_RECONSTRUCTED)]
    for removed, budget in zip(args.removed, budgets, strict=True):
        space = replace(ctx.setup.space, budget=parse_budget(budget, dense_params))
        for method, seed, rebuild in runs:
            if (removed, method, seed, rebuild) in done:
                continue
            print(f"[compare] {removed} removed: {method} (seed {seed}){' + reconstruction' * rebuild}",
                  file=sys.stderr)
            summary = (search_run(run_arguments(args, budget), removed, seed, ctx.out, args.windows)
                       if method == "searched" else None)
            try:
                rows.append(measure(method, removed, ctx, space, summary, seed, rebuild))
            except Exception as err:  # a peer that breaks on this model is a result too; ours breaking is a bug
                if method != "Torch-Pruning":
                    raise
                print(f"[compare] {method} failed: {err!r}", file=sys.stderr)
                rows.append(Row(removed, method, 0, math.nan, math.nan, 0.0, 0, f"failed: {err}"[:160]))
            write_atomic(ctx.out / "results.json",
                         json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=1))
    return rows


def report(args: argparse.Namespace, argv: list[str] | None, ctx: Context, rows: list[Row]) -> None:
    """Write results.md (this run's budgets and methods, in table order) and the plot; print the table."""
    out = ctx.out
    order = {key: i for i, key in enumerate((r, m, s, b) for r in args.removed for m in METHODS for b in (False, True)
                                            for s in args.seeds)}
    rows = sorted((r for r in rows if (r.removed, r.method, r.seed, r.reconstructed) in order),
                  key=lambda r: order[r.removed, r.method, r.seed, r.reconstructed])
    dense_ppl = perplexity(ctx.setup.model, ctx.held_out, ctx.setup.config.batch_size)
    text = table(rows, dense_ppl, Architecture.full(ctx.setup.space.spec).params())
    write_atomic(out / "results.md", provenance.header("experiments.compare", argv) + text)
    plot(rows, dense_ppl, out / "compare.png", f"{Path(args.model).name}: perplexity vs parameters")
    print(text)
    print(f"table: {out / 'results.md'}\nplot:  {out / 'compare.png'}")


if __name__ == "__main__":
    sys.exit(main())
