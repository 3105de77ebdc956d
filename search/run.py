"""`python -m search.run`: predictor-guided search for a per-layer pruning that fits a parameter budget.

Examples:
    python -m search.run                                   # shipped reference model, 60% budget, 24 trials
    python -m search.run --model meta-llama/Llama-2-7b-hf --budget 5B --calibration wikitext2 --evaluation wikitext2
    python -m search.run --out runs/mine                   # run again with the same --out to resume
    python -m search.run --out runs/shared --storage postgresql://user@host/db   # one worker per GPU/machine
    optuna-dashboard sqlite:///runs/mine/study.db          # watch it
"""

from __future__ import annotations

import logging
import shlex
import sys
import warnings

import optuna

from pruning.architecture import format_count
from search import cli_args
from search.config import RunConfig, RunLayout
from search.plan import check_fits, make_plan
from search.runner import SearchRun
from search.setup import USER_ERRORS, resolve_device
from search.timing import time_plan


def resume_command(config: RunConfig, layout: RunLayout, argv: list[str]) -> str:
    args = list(argv)
    if not config.out:
        args += ["--out", str(layout.root)]
    return "python -m search.run " + shlex.join(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli_args.parser("python -m search.run", __doc__)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the memory plan (budget, search space, weights, peak per stage, cost per trial) "
                        "from the model's config alone and exit; a real run prints it first and refuses to start "
                        "when it does not fit the device")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    layout = None  # known once the run directory is open
    try:
        config = RunConfig(**cli_args.config_values(args))
        device = resolve_device(config.device)
        plan = make_plan(config, device)
        print(plan.to_text(), file=sys.stdout if args.dry_run else sys.stderr)
        if plan.problem() is None:
            print(time_plan(config, device).to_text(), file=sys.stdout if args.dry_run else sys.stderr)
        if args.dry_run:
            return 0
        check_fits(plan, config)
        run = SearchRun(config, command="python -m search.run " + shlex.join(argv))
        prepared = run.prepare()
        layout = prepared.setup.layout
        print(f"run directory: {layout.root}\nbudget: {format_count(prepared.setup.space.budget)} parameters\n"
              f"watch: optuna-dashboard {layout.storage_url(config).removeprefix('journal:')}", file=sys.stderr)
        summary = run.complete(prepared)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = f"\nresume with: {resume_command(config, layout, argv)}" if layout else ""
        print(f"\ninterrupted: the running trial is marked failed, finished trials are kept.{resume}", file=sys.stderr)
        return 130
    print(summary.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
