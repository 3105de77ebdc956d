"""`python -m search.export`: prune a finished run's best (or chosen) architecture, recover it, export it.

Examples:
    python -m search.export --run runs/mine --out pruned-model
    python -m search.export --run runs/mine --out pruned.gguf --format gguf --gguf-type q8_0
    python -m search.export --run runs/mine --trial 17 --out pruned-17 --recover-steps 400 --distill 0.5
    python -m search.export --run runs/mine --out tuned --task qa.jsonl --task-template "Q: {question}\\nA:" --shots 5

Options left out keep the run's own settings (its --task included). `python -m search.run` calls the same code
at the end of a search (into <run>/model).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from search import cli_args
from search.recovery import RunDirectoryError, export_from_run
from search.setup import USER_ERRORS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = cli_args.parser("python -m search.export", __doc__, cli_args.AFTER_SEARCH, keep_run_settings=True)
    p.add_argument("--run", required=True, help="a run directory written by python -m search.run")
    p.add_argument("--trial", type=int, help="export this trial's architecture instead of the best")
    p.add_argument("--out", required=True, help="directory (hf) or .gguf file (gguf) to create for the exported model")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    try:
        overrides = cli_args.config_values(args, cli_args.AFTER_SEARCH)
        record = export_from_run(Path(args.run), Path(args.out), overrides, args.trial, args.force,
                                 "python -m search.export " + shlex.join(argv))
    except (*USER_ERRORS, RunDirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(record.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
