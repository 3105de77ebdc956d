"""Recovery evidence: dense vs searched-and-pruned vs + LoRA vs + LoRA + distillation, at several budgets.

    python -m experiments.recovery_study [--budgets 80% 50%] [--trials 24] [--steps 100] [--out runs/recovery_study]

For each budget: one search (`search.pipeline.run_search`, no export), then its best architecture
recovered and exported twice (`search.pipeline.recover_architecture`), with distillation weight 0
and 0.5 (same LoRA steps and data). Perplexity is
on the run's evaluation windows; "retained" is dense perplexity ÷ model perplexity.
Writes results.md to --out and prints it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from experiments import provenance
from pruning.architecture import Architecture
from search.config import RunConfig
from search.pipeline import recover_architecture, run_search
from search.recovery import RecoveryRecord


def export_record(config: RunConfig, arch: Architecture, out: Path, steps: int, distill: float) -> RecoveryRecord:
    return recover_architecture(replace(config, recover_steps=steps, distill=distill), arch, out,
                                "python -m experiments.recovery_study")


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
        config = RunConfig(budget=budget, trials=args.trials, export=False, out=str(run_dir))
        summary = run_search(config)
        arch = Architecture.from_json((run_dir / "best_architecture.json").read_text())
        lora = export_record(config, arch, out / f"model-{run_dir.name}-lora", args.steps, 0.0)
        distilled = export_record(config, arch, out / f"model-{run_dir.name}-lora-kd", args.steps, 0.5)
        cells = {
            "dense": lora.dense["perplexity"],
            "uniform (no recovery)": summary.uniform_perplexity,
            "searched": lora.pruned["perplexity"],
            "searched + LoRA": lora.recovered["perplexity"],
            "searched + LoRA + KD": distilled.recovered["perplexity"],
        }
        rows.append((budget, summary.best_params, cells))
    header = list(rows[0][2])
    lines = ["| params kept | parameters | " + " | ".join(header) + " | retained (best) |",
             "|---" * (len(header) + 3) + "|"]
    for budget, params, cells in rows:
        best = min(cells["searched + LoRA"], cells["searched + LoRA + KD"])
        values = " | ".join(f"{v:.2f}" for v in cells.values())
        lines.append(f"| {budget} | {params:,} | {values} | {cells['dense'] / best:.1%} |")
    text = "Perplexity on the evaluation windows (lower is better)\n\n" + "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(provenance.header("experiments.recovery_study", argv) + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
