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
    metrics_before: Mapping[str, float] = field(default_factory=dict)
    metrics_after: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("budget", "command"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise CardError(f"model card {name} must be a non-empty string (e.g. budget='50%')")
        for name in ("metrics_before", "metrics_after"):
            metrics = dict(getattr(self, name))
            if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in metrics.values()):
                raise CardError(f"model card {name} must map metric names to numbers, got {metrics}")
            object.__setattr__(self, name, metrics)


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
    names = list(dict.fromkeys([*card.metrics_before, *card.metrics_after]))
    if not names:
        return ["No metrics were recorded."]
    rows = ["| metric | before recovery | after recovery |", "|---|---:|---:|"]
    for name in names:
        cells = [f"{m[name]:.4g}" if name in m else "–" for m in (card.metrics_before, card.metrics_after)]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return rows


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
