"""The README.md model card of an exported pruned model (Markdown with Hub metadata)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pruning.architecture import Architecture, format_count


class CardError(ValueError):
    pass


@dataclass(frozen=True)
class ModelCard:
    """What the README.md of an export says beyond the architecture itself."""

    budget: str
    command: str
    metrics_before: Mapping[str, float] = field(default_factory=dict)  # the sliced model
    metrics_after: Mapping[str, float] = field(default_factory=dict)  # after recovery
    metrics_dense: Mapping[str, float] = field(default_factory=dict)  # the base model, same data
    comparisons: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # other prunings, same budget

    def __post_init__(self) -> None:
        for name in ("budget", "command"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise CardError(f"model card {name} must be a non-empty string (e.g. budget='50%')")
        for name in ("metrics_before", "metrics_after", "metrics_dense"):
            object.__setattr__(self, name, _numbers(getattr(self, name), f"model card {name}"))
        object.__setattr__(self, "comparisons", {row: _numbers(m, f"model card comparison {row!r}")
                                                 for row, m in dict(self.comparisons).items()})

    def rows(self) -> list[tuple[str, dict[str, float]]]:
        """(model, metrics) of every model measured, in the order the card lists them."""
        rows = [("base model (dense)", self.metrics_dense), *self.comparisons.items(),
                ("this model, sliced (before recovery)", self.metrics_before),
                ("this model, after recovery", self.metrics_after)]
        return [(name, m) for name, m in rows if m]


def _numbers(metrics: Mapping[str, float], what: str) -> dict[str, float]:
    metrics = dict(metrics)
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in metrics.values()):
        raise CardError(f"{what} must map metric names to numbers, got {metrics}")
    return metrics


def _shape_table(arch: Architecture) -> list[str]:
    s = arch.spec
    rows = ["| layer | KV heads | query heads | heads / group | FFN channels | attention | MLP | params |",
            "|---:|---:|---:|---:|---:|---|---|---:|"]
    for i, x in enumerate(arch.layers):
        params = s.attention_params(x.kv_heads, x.heads_per_group) + s.mlp_params(x.ffn_channels)
        rows.append(
            f"| {i} | {x.kv_heads}/{s.num_kv_heads} | {x.query_heads}/{s.num_heads} | {x.heads_per_group} "
            f"| {x.ffn_channels}/{s.intermediate_size} | {'dropped' if x.attention_dropped else 'kept'} "
            f"| {'dropped' if x.mlp_dropped else 'kept'} | {format_count(params)} |"
        )
    return rows


def _metrics_table(card: ModelCard) -> list[str]:
    """One row per model measured (dense, other prunings, this one before and after recovery), one column per
    metric; on held-out data no search or recovery choice was made on."""
    models = card.rows()
    names = list(dict.fromkeys(name for _, m in models for name in m))
    if not names:
        return ["No metrics were recorded."]
    rows = [f"| model | {' | '.join(names)} |", "|---|" + "---:|" * len(names)]
    for model, m in models:
        rows.append(f"| {model} | " + " | ".join(f"{m[n]:.4g}" if n in m else "–" for n in names) + " |")
    return rows


LLAMA_CPP_SECTION = (
    "## llama.cpp",
    "",
    "`python -m search.export --run <run> --format gguf --gguf-type q8_0 --out model.gguf` writes this model "
    "as one GGUF file (per-layer shapes as llama.cpp's `deci` architecture; f32, f16 or q8_0). Run it with",
    "",
    "```bash",
    'llama-cli -m model.gguf -p "def main():" -n 64',
    "```",
    "",
    "or from Python (`pip install llama-cpp-python`):",
    "",
    "```python",
    "from llama_cpp import Llama",
    'llm = Llama(model_path="model.gguf")',
    'print(llm("def main():", max_tokens=64)["choices"][0]["text"])',
    "```",
    "",
)


def render(arch: Architecture, card: ModelCard, remote_code: bool) -> str:
    s = arch.spec
    params, dense = arch.params(), type(arch).full(s).params()
    trust = ", trust_remote_code=True" if remote_code else ""
    layout = (
        "Layers differ in shape, so the directory carries its modelling code (`modeling_pruned.py`, "
        "torch + transformers only) and the per-layer shapes in `config.json` under `layer_shapes`."
        if remote_code
        else "Every layer has the same shape, so this is a plain transformers model of the base family."
    )
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {s.base_model}",
        "tags: [pruned, structured-pruning, lora]",
        "---",
        "",
        f"# {s.base_model}, structurally pruned to {card.budget}",
        "",
        f"- Base model: `{s.base_model}` ({s.family}, {format_count(dense)} parameters)",
        f"- Budget: {card.budget}",
        f"- Parameters: {params:,} ({format_count(params)}, {params / dense:.1%} of the base model)",
        f"- Made by: `{card.command}`",
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = AutoModelForCausalLM.from_pretrained(path{trust})",
        f"tokenizer = AutoTokenizer.from_pretrained(path{trust})",
        "```",
        "",
        layout,
        "",
        *LLAMA_CPP_SECTION,
        "## Metrics",
        "",
        *_metrics_table(card),
        "",
        "## Per-layer shapes",
        "",
        *_shape_table(arch),
        "",
    ]
    return "\n".join(lines)
