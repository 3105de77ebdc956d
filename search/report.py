"""What a finished search tells a person: summary record, Markdown, and dashboard note and plots."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import optuna
import optuna_dashboard
import plotly.graph_objects as go
from scipy.stats import kendalltau

from pruning.architecture import Architecture, format_count
from search.recovery import RecoveryRecord
from search.trials import completed, measurements, trial_architecture

FLAT_PERPLEXITIES = ("base", "uniform", "threshold", "knapsack", "best")


@dataclass(frozen=True)
class RunSummary:
    model: str
    run_dir: str
    study_name: str
    storage: str
    budget_params: int
    base_params: int
    best_params: int
    best_trial: int
    trials_complete: int
    trials_failed: int
    held_out_windows: int  # every metric below is on these: evaluation windows no trial was measured on
    windows_evaluated: int  # the search's cost: sensitivity table + trials, in evaluation windows
    predictor_kendall_tau: float | None  # predictions made before measuring vs the measurements
    predictor_pairs: int
    wall_time_s: float
    recovery: RecoveryRecord | None = None
    objective: str = "perplexity"  # what the trials measured
    objective_direction: str = "minimize"
    # held-out metrics of each model (base, uniform, threshold, knapsack with the tables, searched): perplexity and,
    # for another objective, the objective with its companions (`Score.flat`); the recovered model's are in `recovery`
    objective_values: dict[str, dict[str, float]] = field(default_factory=dict)
    # wall seconds per stage of the invocation that wrote the summary (a resumed run redoes only what is missing)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def perplexity(self, model: str) -> float | None:
        """Held-out perplexity of `model` (a key of `objective_values`), None where it was not measured."""
        return self.objective_values.get(model, {}).get("perplexity")

    base_perplexity = property(lambda self: self.perplexity("base"))
    uniform_perplexity = property(lambda self: self.perplexity("uniform"))
    threshold_perplexity = property(lambda self: self.perplexity("threshold"))
    knapsack_perplexity = property(lambda self: self.perplexity("knapsack"))
    best_perplexity = property(lambda self: self.perplexity("searched"))

    def dashboard_command(self) -> str:
        target = self.storage.removeprefix("journal:")
        return f"optuna-dashboard {target}"

    def to_json(self) -> str:
        """The fields, and for readers of summary.json each model's perplexity as `<model>_perplexity` and the
        dashboard command (derived from the fields; `from_json` drops them)."""
        recovery = self.recovery.to_dict() if self.recovery else None
        flat = {f"{name}_perplexity": getattr(self, f"{name}_perplexity") for name in FLAT_PERPLEXITIES}
        return json.dumps({**asdict(self), "recovery": recovery, **flat, "dashboard": self.dashboard_command()},
                          indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunSummary:
        data = json.loads(text)
        for key in ("dashboard", *(f"{name}_perplexity" for name in FLAT_PERPLEXITIES)):
            data.pop(key, None)
        if data.get("recovery") is not None:
            data["recovery"] = RecoveryRecord.from_dict(data["recovery"])
        return cls(**data)

    def objective_rows(self) -> list[tuple[str, dict[str, float]]]:
        """(model, held-out metrics) for every model the objective was measured on, recovered included."""
        rows = list(self.objective_values.items())
        if self.recovery is not None:
            rows.append(("searched, sliced + LoRA (exported)", dict(self.recovery.final)))
        return rows

    def _objective_table(self) -> str:
        rows = self.objective_rows()
        if self.objective == "perplexity" or not rows:
            return ""
        names = list(dict.fromkeys(n for _, m in rows for n in m))
        if self.objective == "task":  # recovery's task_accuracy is the task objective on the same held-out examples
            names = [n for n in names if n != "task_accuracy"]
        lines = [f"| model | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]
        lines += [f"| {model} | " + " | ".join(f"{m[n]:.4g}" if n in m else "–" for n in names) + " |"
                  for model, m in rows]
        return (f"Objective **{self.objective}** ({self.objective_direction}d) on held-out data no candidate was "
                "chosen on:\n\n" + "\n".join(lines) + "\n\n")

    def to_markdown(self) -> str:
        def ratio(p: int) -> str:
            return f"{format_count(p)} ({p / self.base_params:.1%})"

        labels = {"base": "base model", "uniform": "uniform pruning", "threshold": "importance threshold (FLAP-style)",
                  "knapsack": "sensitivity knapsack", "searched": f"searched (trial {self.best_trial})"}
        params = {"base": ratio(self.base_params), "searched": ratio(self.best_params)}
        rows = [(label, params.get(name, "same budget"), self.perplexity(name)) for name, label in labels.items()
                if self.perplexity(name) is not None]
        table = "\n".join(f"| {name} | {params} | {ppl:.3f} |" for name, params, ppl in rows)
        recovery = ""
        if self.recovery:
            r = self.recovery
            tuned = r.final["perplexity"]
            on = "the task margin on its search examples" if r.validated_on != "perplexity" else "the search windows"
            selected = f" (step {r.selected_step} kept, best on {on})" if r.selected_step is not None else ""
            recovery = (
                f"\n**Exported model**: `{r.export}` — perplexity {tuned:.3f} after {r.steps} LoRA steps{selected} "
                f"(sliced {r.pruned['perplexity']:.3f}{_without(r)}, dense {r.dense['perplexity']:.3f}; "
                f"dense ÷ exported perplexity {r.dense['perplexity'] / tuned:.1%}).\n"
                + "".join(f"\n**Note**: {note}.\n" for note in r.notes)
            )
        return (
            f"## Pruning search: {self.model}\n\n"
            + self._objective_table() +
            f"Budget {format_count(self.budget_params)} parameters; {self.trials_complete} candidates measured "
            f"({self.trials_failed} failed) in {self.wall_time_s / 60:.1f} min; "
            f"{self.windows_evaluated:,} evaluation windows measured, sensitivity table included.\n\n"
            f"Perplexity on {self.held_out_windows} held-out windows that no candidate was chosen on:\n\n"
            f"| model | parameters | perplexity |\n|---|---|---|\n{table}\n\n"
            + self._time_line() +
            f"{recovery}\nFiles: `{self.run_dir}`  \nDashboard: `{self.dashboard_command()}`\n"
        )


    def _time_line(self) -> str:
        """Where this invocation's time went, stage by stage (the predictor's own Kendall τ stays in the JSON: over
        a few guided trials it differs from chance by less than the windows' noise)."""
        if not self.stage_seconds:
            return ""
        stages = " · ".join(f"{name} {seconds:,.0f} s" for name, seconds in self.stage_seconds.items())
        return f"Time by stage: {stages}.\n"


def _without(r: RecoveryRecord) -> str:
    """What reconstruction changed, when it ran: " reconstructed (damp 0.01, best of 3 on the search windows) in
    30 s; 123.456 without", or why it was not kept."""
    if r.unreconstructed is None:
        return ""
    tried = len(r.reconstruction_damps)
    if r.reconstruction_search is not None and not r.reconstruction_kept:
        before, after = r.reconstruction_search
        return (f" not reconstructed: the re-fit ({r.reconstruction_seconds:.0f} s) raised the search windows' "
                f"perplexity from {before:.3f} to {after:.3f}{f' at best of {tried} dampings' * (tried > 1)}, "
                "so it was undone")
    how = f" (damp {r.reconstruction_damp:g}, best of {tried} on the search windows)" if tried > 1 else ""
    return f" reconstructed{how} in {r.reconstruction_seconds:.0f} s; {r.unreconstructed['perplexity']:.3f} without"


def predictions(study: optuna.Study) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(predicted loss, measured loss, trial numbers) of completed trials the predictor proposed (losses:
    what the predictor learns, `search.trials.to_loss`)."""
    rows = [(m.prediction, m.loss, m.number) for m in measurements(study) if m.prediction is not None]
    if not rows:
        return np.array([]), np.array([]), []
    predicted, measured_values, numbers = zip(*rows, strict=True)
    return np.array(predicted), np.array(measured_values), list(numbers)


def own_kendall(study: optuna.Study) -> tuple[float | None, int]:
    predicted, measured_values, _ = predictions(study)
    if len(predicted) < 3:
        return None, len(predicted)
    return float(kendalltau(predicted, measured_values).statistic), len(predicted)


def publish(study: optuna.Study, summary: RunSummary) -> None:
    """Objective name, the Markdown summary as the study note, and three plots on the dashboard."""
    study.set_metric_names([summary.objective])
    optuna_dashboard.save_note(study, summary.to_markdown())
    best = trial_architecture(study.trials[summary.best_trial])
    for graph_id, figure in (
        ("predicted-vs-measured", _predicted_vs_measured(study)),
        ("best-architecture", _architecture_figure(best)),
        ("best-so-far", _best_so_far(study)),
    ):
        optuna_dashboard.save_plotly_graph_object(study, figure, graph_object_id=graph_id)


def _predicted_vs_measured(study: optuna.Study) -> go.Figure:
    predicted, measured_values, numbers = predictions(study)
    fig = go.Figure(
        go.Scatter(
            x=predicted, y=measured_values, mode="markers", text=[f"trial {n}" for n in numbers], name="guided trials"
        )
    )
    if len(predicted):
        lo, hi = float(min(predicted.min(), measured_values.min())), float(max(predicted.max(), measured_values.max()))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x"))
    fig.update_layout(
        title="Predicted (before measuring) vs measured loss", xaxis_title="predicted", yaxis_title="measured"
    )
    return fig


def _architecture_figure(arch: Architecture) -> go.Figure:
    s = arch.spec
    layers = list(range(s.num_layers))
    attn = [x.query_heads / s.num_heads for x in arch.layers]
    ffn = [x.ffn_channels / s.intermediate_size for x in arch.layers]
    fig = go.Figure(
        [go.Bar(x=layers, y=attn, name="attention heads kept"), go.Bar(x=layers, y=ffn, name="FFN channels kept")]
    )
    fig.update_layout(
        title=f"Best architecture: kept share per layer ({format_count(arch.params())} params)",
        xaxis_title="layer",
        yaxis_title="kept share",
        barmode="group",
        yaxis_range=[0, 1],
    )
    return fig


def _best_so_far(study: optuna.Study) -> go.Figure:
    done = completed(study)
    numbers = [t.number for t in done]
    values = np.array([t.value for t in done])
    best = np.minimum if study.direction == optuna.study.StudyDirection.MINIMIZE else np.maximum
    name = study.metric_names[0] if study.metric_names else "objective"
    fig = go.Figure(
        [
            go.Scatter(x=numbers, y=values, mode="markers", name="measured"),
            go.Scatter(x=numbers, y=best.accumulate(values) if len(values) else values, mode="lines",
                       name="best so far"),
        ]
    )
    fig.update_layout(title=f"{name} by trial", xaxis_title="trial", yaxis_title=name)
    return fig
