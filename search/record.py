"""What a run keeps on its Optuna study beside the trials, as one frozen record: the only code that touches the
study's user attributes (the trials' are `search.trials`'s).

    user attr             field                  written
    identity              identity               when the study is created (`search.study.open_study`)
    sensitivity           tables                 once the sensitivity tables are measured (samplers that need them)
    baselines             baselines: perplexity  held-out perplexity of the base model and the rivals
    objective_baselines   baselines: the rest    with an objective other than perplexity, its metrics on them too
    recovery              recovery               after the export (`RecoveryRecord.to_dict()`)

Each model's held-out metrics are one mapping here (`baselines`); on the study they keep the layout runs
have always written (`baselines` holds the perplexities, `objective_baselines` repeats them beside the
objective's), so studies written before and after this record resume alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import optuna


@dataclass(frozen=True)
class TablesCost:
    """What the sensitivity tables cost: how many, their entries, windows per entry, all windows, seconds."""

    tables: int = 0
    measurements: int = 0
    windows: int = 0
    windows_evaluated: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class StudyRecord:
    identity: Mapping | None = None  # what must match to resume the study (`search.run.identity`)
    tables: TablesCost | None = None
    baselines: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # model -> held-out metrics
    recovery: Mapping | None = None  # `search.export.RecoveryRecord.to_dict()` of the exported model

    @property
    def perplexities(self) -> dict[str, float] | None:
        """Held-out perplexity of each baseline model, or None before they are measured."""
        return {name: m["perplexity"] for name, m in self.baselines.items()} if self.baselines else None

    @property
    def has_objective_baselines(self) -> bool:
        """Whether the baselines hold the objective's metrics as well as their perplexity."""
        return any(set(m) - {"perplexity"} for m in self.baselines.values())

    @classmethod
    def from_study(cls, study: optuna.Study) -> StudyRecord:
        attrs = study.user_attrs
        tables = attrs.get("sensitivity")
        baselines = attrs.get("objective_baselines") or {
            name: {"perplexity": value} for name, value in attrs.get("baselines", {}).items()}
        return cls(identity=attrs.get("identity"), tables=_tables_cost(tables) if tables else None,
                   baselines=baselines, recovery=attrs.get("recovery"))

    def to_attrs(self) -> dict:
        """The study user attributes this record stands for (set fields only)."""
        attrs = {"identity": self.identity, "sensitivity": asdict(self.tables) if self.tables else None,
                 "baselines": self.perplexities,
                 "objective_baselines": dict(self.baselines) if self.has_objective_baselines else None,
                 "recovery": self.recovery}
        return {key: value for key, value in attrs.items() if value is not None}

    def to_study(self, study: optuna.Study) -> None:
        """Write what the study does not hold yet, or holds otherwise; what this record leaves unset is kept."""
        stored = study.user_attrs
        for key, value in self.to_attrs().items():
            if stored.get(key) != value:
                study.set_user_attr(key, value)


def _tables_cost(stored: Mapping) -> TablesCost:
    """As stored; a key an older run did not write reads as 0."""
    return TablesCost(**{k: v for k, v in stored.items() if k in TablesCost.__dataclass_fields__})
