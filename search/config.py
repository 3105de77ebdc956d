"""Typed, validated settings of one search run, and the run directory's layout."""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.gguf import GGUF_TYPES
from pruning import reference
from pruning.reconstruct import DAMP_CHOICES, TARGETS
from search import formats, objectives, samplers

PREDICTOR_TARGETS = ("value", "margin")  # what the predictor learns: the objective's value, or the task margin
IMPORTANCE_METHODS = ("wanda", "fluctuation", "taylor")


class ConfigError(ValueError):
    pass


def option(default, help: str, group: str = "search", **cli):
    """A RunConfig field and its command-line option (`search.cli_args` builds argparse from these): `help` is the
    option's text, `group` its section, and `cli` any argparse keyword (flags, choices, action, metavar) or
    `default_help`, what --help says the default is where the value itself means little."""
    return field(default=default, metadata={"help": help, "group": group, **cli})


FINAL_EVAL_WINDOWS = 128  # evenly spread over the evaluation text: the summary and export metrics


@dataclass(frozen=True)
class RunConfig:
    model: str = option(str(reference.MODEL_DIR), "local model directory, hub id, or .gguf file (dequantized; "
                        "pip install 'prunesearch[gguf]')", default_help="the shipped reference model")
    budget: str = option("60%", "parameters to keep, embeddings included: 5B, 350M, 2.5e9, or 70%% / 0.7 of the "
                         "model")
    trials: int = option(24, "candidates to measure")
    objective: str = option("perplexity", "what each trial measures: perplexity, kl (to the dense model), task "
                            "(accuracy on --task) or lm-eval:TASK[,TASK] (lm-evaluation-harness, "
                            "pip install 'prunesearch[eval]')")
    task_search_examples: int = option(64, "--objective task: training examples of --task each trial is measured "
                                       "on; 20%% of --task is held out for the summary")
    predictor_target: str = option("value", "what the predictor learns: the objective's value, or with --objective "
                                   "task the smooth log-likelihood margin of the right option",
                                   choices=PREDICTOR_TARGETS)
    eval_limit: int = option(50, "--objective lm-eval:...: documents per task each trial is measured on; the "
                             "summary reports on the rest")
    eval_include: str | None = option(None, "directory of lm-eval task YAMLs (a local YAML over a local JSONL "
                                      "works offline)")
    calibration: str = option(str(reference.CALIBRATION_TEXT), "text for importance scores: file, directory, or "
                              "wikitext2/c4 online", default_help="shipped text")
    evaluation: str = option(str(reference.EVALUATION_TEXT), "held-out text the metric is measured on",
                             default_help="shipped text")
    seq_len: int = option(256, "tokens per window")
    calibration_windows: int = option(64, "calibration windows for importance scores and reconstruction")
    search_windows: int = option(32, "evaluation windows per trial; the summary reports on the others, of up to "
                                 f"{FINAL_EVAL_WINDOWS}")
    importance: str = option("wanda", "unit importance scores", choices=IMPORTANCE_METHODS)
    sampler: str = option("predictor", f"{', '.join(samplers.REGISTRY)}; predictor and knapsack first measure the "
                          "sensitivity table and start from its knapsack, knapsack then ranks by the table alone")
    sensitivity_windows: int = option(2, "search windows each sensitivity-table entry is measured on, at most all "
                                      "(on SmolLM2 at 30%% removed, 2 gave a better knapsack and search than 4 at "
                                      "half the dense table's cost; on the reference model 4 gave the better "
                                      "knapsack)")
    sensitivity_points: int = option(8, "kept sizes measured per sublayer for the sensitivity table")
    local_table: bool = option(True, "also measure a table around the first table's knapsack (each sublayer moved "
                               "while the others stay pruned) and start the search from its knapsack")
    local_reach: int = option(1, "grid sizes the local table measures on each side of the knapsack's size, per "
                              "sublayer; sizes farther out follow the first table's curve. --sensitivity-points or "
                              "more measures them all, at about the first table's cost")
    n_startup: int = option(8, "trials before the predictor guides")
    ffn_step: int | None = option(None, "FFN channels kept are a multiple of this. A GGUF export pads other "
                                  "widths with zero channels to whole blocks (exact, but bytes spent on nothing): "
                                  "32 for Q8_0, 256 for K-quants (Q4_K...) if you will quantize the export further "
                                  "with llama-quantize",
                                  default_help="8; with --format gguf the type's block, so every width the search "
                                  "proposes fits it: 32 for q8_0")
    allow_drop: bool = option(True, "never drop a whole attention or MLP sublayer", flags=("--no-drop",),
                              action="store_false")
    storage: str | None = option(None, "Optuna storage URL", default_help="sqlite:///<out>/study.db; "
                                 "journal:<file> or postgresql://... for several workers")
    study_name: str | None = option(None, "Optuna study name", default_help="the run directory's name")
    out: str | None = option(None, "run directory; reuse it to resume", default_help="runs/<model>-<budget>-<time>")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    batch_size: int = option(8, "windows per forward pass")
    seed: int = option(0, "seed of the sampler, importance ties and recovery")
    export: bool = option(True, "stop after the search: no slicing, recovery or export", flags=("--no-export",),
                          action="store_false")
    export_format: str = option("hf", "hf: a transformers directory (per-layer remote code when shapes differ); "
                                "gguf: one file for llama.cpp, per-layer shapes as its deci architecture",
                                group="format", flags=("--format",), choices=tuple(formats.REGISTRY))
    gguf_type: str = option("q8_0", "GGUF weight type; q8_0 needs every FFN width a multiple of 32", group="format",
                            choices=GGUF_TYPES)
    reconstruct: bool = option(True, "re-fit each layer's o_proj and down_proj on calibration activations so its "
                               "output stays close to the dense weights' (least squares, layer by layer; no "
                               "parameter added)", group="reconstruction")
    reconstruct_damp: float | None = option(None, "ridge damping of the re-fit, a share of the mean input energy",
                                            group="reconstruction", default_help="each of "
                                            f"{', '.join(f'{d:g}' for d in DAMP_CHOICES)}, the best on the search "
                                            "windows kept")
    reconstruct_target: str = option("self", "self: fit the dense weights' output on the pruned model's inputs; "
                                     "dense: fit the dense model's output plus the residual stream's drift (runs "
                                     "the dense model alongside; better for heavy fixed-ratio pruning of the "
                                     "reference model, over-fits on SmolLM2)", group="reconstruction",
                                     choices=TARGETS)
    recover_steps: int = option(50, "LoRA steps on the calibration text; 0 exports without tuning (on SmolLM2 at "
                                "30%% removed, 50 steps gave 92%% of what 100 gave). Every fifth of "
                                "the steps the search windows' perplexity (with --task: the task margin on its "
                                "search examples, which tuning leaves out) is measured and the best state is "
                                "exported, the untuned sliced model included, so recovery never makes it worse "
                                "there; if held-out perplexity still rises, the summary says so", group="recovery")
    recover_windows: int = option(512, "calibration windows to tune on (at most --recover-steps x --batch-size, "
                                 "the rows the steps draw)", group="recovery")
    lora_rank: int = option(8, "LoRA rank", group="recovery")
    distill: float = option(0.5, "weight of KL distillation from the dense model, 0..1", group="recovery")
    domains: tuple[str, ...] = option((), "extra training text; several domains are mixed by dynamic batch loading "
                                      "(repeatable)", group="recovery", flags=("--domain",), metavar="NAME=PATH",
                                      default_help="none")
    task: str | None = option(None, "JSONL of task examples to tune and score on (20%% held out)", group="recovery")
    task_template: str = option("{prompt}", "str.format prompt over the JSONL fields", group="recovery")
    task_answer_prefix: str = option(" ", "text before every answer and option, e.g. a space or a newline",
                                     group="recovery", default_help="a space")
    shots: int = option(0, "few-shot examples before each task prompt", group="recovery")

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
            (self.reconstruct_damp is None or self.reconstruct_damp > 0,
             f"--reconstruct-damp must be positive, got {self.reconstruct_damp}"),
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

    def domain_sources(self) -> list[tuple[str, str]]:
        """(name, text source) of every language-modelling domain recovery trains on."""
        return [("calibration", self.calibration), *(tuple(d.split("=", 1)) for d in self.domains)]

    def tuning_windows(self) -> int:
        """Windows per domain recovery tunes on: --recover-windows, but no more than its steps draw (B per step),
        so the dense model's targets are not computed for rows no step reads."""
        return max(1, min(self.recover_windows, self.recover_steps * self.batch_size))

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
