"""Typed, validated settings of one search run, and the run directory's layout."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.gguf import GGUF_TYPES
from pruning import reference
from pruning.reconstruct import DEFAULT_DAMP, TARGETS
from search import formats, objectives, samplers

PREDICTOR_TARGETS = ("value", "margin")  # what the predictor learns: the objective's value, or the task margin
IMPORTANCE_METHODS = ("wanda", "fluctuation", "taylor")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RunConfig:
    model: str = str(reference.MODEL_DIR)
    budget: str = "60%"
    trials: int = 24
    objective: str = "perplexity"
    calibration: str = str(reference.CALIBRATION_TEXT)
    evaluation: str = str(reference.EVALUATION_TEXT)
    seq_len: int = 256
    calibration_windows: int = 64
    search_windows: int = 32  # evaluation windows each trial is measured on; the summary reports on the others
    importance: str = "wanda"
    sensitivity_windows: int = 4  # search windows each sensitivity-table entry is measured on (at most all)
    sensitivity_points: int = 8  # kept sizes measured per sublayer
    local_table: bool = True  # measure a second table around the dense table's knapsack; the search starts there
    local_reach: int = 1  # grid sizes it measures on each side of the knapsack's; farther ones follow the dense table
    sampler: str = "predictor"
    n_startup: int = 8
    ffn_step: int | None = None  # None: 8, or the GGUF type's block (32 for q8_0) with export_format "gguf"
    allow_drop: bool = True
    storage: str | None = None
    study_name: str | None = None
    out: str | None = None
    device: str = "auto"
    batch_size: int = 8
    seed: int = 0
    export: bool = True  # after the search: slice, recover and export the best architecture
    export_format: str = "hf"  # hf: a transformers directory; gguf: one llama.cpp file
    gguf_type: str = "q8_0"
    reconstruct: bool = True  # re-fit o_proj / down_proj's kept columns on calibration activations after slicing
    reconstruct_damp: float = DEFAULT_DAMP
    reconstruct_target: str = "self"  # pruning.reconstruct.TARGETS
    recover_steps: int = 100
    recover_windows: int = 512
    lora_rank: int = 8
    distill: float = 0.5
    domains: tuple[str, ...] = ()  # extra training text, "NAME=PATH"
    task: str | None = None
    task_template: str = "{prompt}"
    task_answer_prefix: str = " "  # put before every answer and option (" Paris")
    shots: int = 0
    task_search_examples: int = 64  # training examples of --task each trial is measured on (--objective task)
    predictor_target: str = "value"
    eval_limit: int = 50  # lm-eval documents per task each trial is measured on (--objective lm-eval:...)
    eval_include: str | None = None  # directory of lm-eval task YAMLs (offline tasks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        if self.ffn_step is None:
            entry = formats.REGISTRY.get(self.export_format)
            object.__setattr__(self, "ffn_step", max(8, entry.ffn_block(self) if entry else 1))
        checks = [
            *((False, problem) for problem in samplers.config_problems(self)),  # the sampler's own checks
            *((False, problem) for problem in objectives.config_problems(self)),  # the objective's own checks
            (self.predictor_target in PREDICTOR_TARGETS,
             f"unknown --predictor-target {self.predictor_target!r}; choose one of {', '.join(PREDICTOR_TARGETS)}"),
            (self.task_search_examples >= 1 and self.eval_limit >= 1,
             "--task-search-examples and --eval-limit must be at least 1"),
            (
                self.importance in IMPORTANCE_METHODS,
                f"unknown importance {self.importance!r}; choose one of {', '.join(IMPORTANCE_METHODS)}",
            ),
            (self.trials >= 1, f"--trials must be at least 1, got {self.trials}"),
            (self.seq_len >= 8, f"--seq-len must be at least 8, got {self.seq_len}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.ffn_step >= 1, f"--ffn-step must be at least 1, got {self.ffn_step}; the default is 8"),
            (self.calibration_windows >= 1 and self.search_windows >= 1, "window counts must be at least 1"),
            (self.sensitivity_windows >= 1, f"--sensitivity-windows must be >= 1, got {self.sensitivity_windows}"),
            (self.sensitivity_points >= 2, f"--sensitivity-points must be at least 2, got {self.sensitivity_points}"),
            (self.local_reach >= 1, f"--local-reach must be at least 1, got {self.local_reach}"),
            (
                self.device in ("auto", "cpu") or self.device.startswith("cuda"),
                f"--device must be auto, cpu or cuda[:N], got {self.device!r}",
            ),
            (self.reconstruct_damp > 0, f"--reconstruct-damp must be positive, got {self.reconstruct_damp}"),
            (self.reconstruct_target in TARGETS,
             f"--reconstruct-target must be one of {', '.join(TARGETS)}, got {self.reconstruct_target!r}"),
            (self.recover_steps >= 0, f"--recover-steps must be >= 0, got {self.recover_steps}"),
            (0 <= self.distill <= 1, f"--distill is a loss weight in [0, 1], got {self.distill}"),
            (self.export_format in formats.REGISTRY,
             f"unknown --format {self.export_format!r}; choose one of {', '.join(formats.REGISTRY)}"),
            (self.gguf_type in GGUF_TYPES,
             f"unknown --gguf-type {self.gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}"),
            (self.lora_rank >= 1 and self.recover_windows >= 1 and self.shots >= 0,
             "--lora-rank and --recover-windows must be >= 1, --shots >= 0"),
            (all("=" in d and d.partition("=")[0] and d.partition("=")[2] for d in self.domains),
             f"--domain takes NAME=PATH, got {list(self.domains)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def check_search_target(self) -> None:
        """A search for a GGUF target (--format gguf) may only propose FFN widths its type holds."""
        block = formats.REGISTRY[self.export_format].ffn_block(self)
        if self.ffn_step % block:
            raise ConfigError(f"--ffn-step {self.ffn_step} lets the search pick FFN widths GGUF {self.gguf_type} "
                              f"cannot hold (rows in blocks of {block}); use --ffn-step {block} or a multiple")

    def domain_sources(self) -> list[tuple[str, str]]:
        """(name, text source) of every language-modelling domain recovery trains on."""
        return [("calibration", self.calibration), *(tuple(d.split("=", 1)) for d in self.domains)]

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        source = Path(self.model.rstrip("/"))
        name = source.stem if source.suffix.lower() == ".gguf" else source.name
        model = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
        budget = self.budget.replace("%", "pct").replace(".", "p")
        return Path("runs") / f"{model}-{budget}-{time.strftime('%Y%m%d-%H%M%S')}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


@dataclass(frozen=True)
class ModelSource:
    """The model file a run was read from (a GGUF), as it was then: resuming or exporting checks it is unchanged."""

    path: str
    sha256: str
    size: int  # bytes

    @classmethod
    def of(cls, path: str | Path) -> ModelSource:
        """Hash the file in 1 MiB chunks (a model file need not fit in memory)."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return cls(str(path), digest.hexdigest(), Path(path).stat().st_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSource:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class RunLayout:
    """Where a run keeps its files."""

    root: Path

    @property
    def study_db(self) -> Path:
        return self.root / "study.db"

    @property
    def config(self) -> Path:
        return self.root / "run.json"

    @property
    def model_source(self) -> Path:
        return self.root / "model_source.json"

    @property
    def predictor(self) -> Path:
        return self.root / "predictor"

    @property
    def best_architecture(self) -> Path:
        return self.root / "best_architecture.json"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def gguf(self) -> Path:
        return self.root / "model.gguf"

    def export_path(self, config: RunConfig) -> Path:
        return self.root / formats.REGISTRY[config.export_format].file_name

    def storage_url(self, config: RunConfig) -> str:
        return config.storage or f"sqlite:///{self.study_db}"

    def study_name(self, config: RunConfig) -> str:
        return config.study_name or self.root.name
