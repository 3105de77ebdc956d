"""Recovery evidence: dense vs searched-and-pruned vs + LoRA vs + LoRA + distillation, at several budgets.

    python -m experiments.recovery_study [--budgets 80% 50%] [--trials 24] [--steps 100] [--out runs/recovery_study]

For each budget: one search (`search.run --no-export`), then `search.export` of its best
architecture twice, with distillation weight 0 and 0.5 (same LoRA steps and data). Perplexity is
on the run's evaluation windows; "retained" is dense perplexity ÷ model perplexity.
Writes results.md to --out and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

from search import export, run


def export_record(run_dir: Path, out: Path, steps: int, distill: float) -> dict:
    buffer = StringIO()
    with redirect_stdout(buffer):
        code = export.main(["--run", str(run_dir), "--out", str(out), "--force", "--recover-steps", str(steps),
                            "--distill", str(distill)])
    if code != 0:
        raise SystemExit(f"export of {run_dir} failed ({code})")
    return json.loads(buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", default=["80%", "50%"])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="runs/recovery_study")
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = []
    for budget in args.budgets:
        run_dir = out / f"search-{budget.replace('%', 'pct')}"
        if run.main(["--budget", budget, "--trials", str(args.trials), "--no-export", "--out", str(run_dir)]) != 0:
            return 1
        summary = json.loads((run_dir / "summary.json").read_text())
        lora = export_record(run_dir, out / f"model-{run_dir.name}-lora", args.steps, 0.0)
        distilled = export_record(run_dir, out / f"model-{run_dir.name}-lora-kd", args.steps, 0.5)
        dense = lora["dense"]["perplexity"]
        cells = {
            "dense": dense,
            "uniform (no recovery)": summary["uniform_perplexity"],
            "searched": lora["pruned"]["perplexity"],
            "searched + LoRA": lora["recovered"]["perplexity"],
            "searched + LoRA + KD": distilled["recovered"]["perplexity"],
        }
        rows.append((budget, summary["best_params"], cells))
    header = list(rows[0][2])
    lines = ["| params kept | parameters | " + " | ".join(header) + " | retained (best) |",
             "|---" * (len(header) + 3) + "|"]
    for budget, params, cells in rows:
        best = min(cells["searched + LoRA"], cells["searched + LoRA + KD"])
        values = " | ".join(f"{v:.2f}" for v in cells.values())
        lines.append(f"| {budget} | {params:,} | {values} | {cells['dense'] / best:.1%} |")
    text = "Perplexity on the evaluation windows (lower is better)\n\n" + "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
