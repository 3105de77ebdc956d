"""The formats a run exports the recovered model in (`--format`), by name: how each is checked and written.

    hf      a transformers directory (the plain class when every layer keeps one shape, per-layer remote code
            otherwise): `finetune.hf_writer.export_model`, with the model card
    gguf    one llama.cpp file of `--gguf-type`: `finetune.gguf.export_gguf`

Adding one is a `write` (and, where it can refuse a model, a `check`) plus one `register_export_format` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.gguf import GGUF_TYPES, block_size, check_export, export_gguf, padding_bytes, tokens_left_out
from finetune.hf_writer import export_model


@dataclass(frozen=True)
class ExportFormat:
    name: str
    # (sliced model, architecture, tokenizer, out, model card, RunConfig, force) -> the path written
    write: Callable[..., Path]
    file_name: str  # what it is called in the run directory
    # (architecture, model config, tokenizer, RunConfig): raise what the format cannot hold, before any search
    check: Callable[..., None] | None = None
    ffn_block: Callable[[object], int] = lambda config: 1  # FFN widths it holds without padding are multiples of this
    # (architecture, tokenizer, RunConfig) -> what writing it changes that a user should know (padding, say)
    notes: Callable[..., tuple[str, ...]] = lambda arch, tokenizer, config: ()


REGISTRY: dict[str, ExportFormat] = {}


def register_export_format(*, name: str, write: Callable[..., Path], file_name: str,
                           check: Callable[..., None] | None = None,
                           ffn_block: Callable[[object], int] | None = None,
                           notes: Callable[..., tuple[str, ...]] | None = None) -> None:
    if name in REGISTRY:
        raise ValueError(f"export format {name!r} is already registered")
    REGISTRY[name] = ExportFormat(name, write, file_name, check, ffn_block or (lambda config: 1),
                                  notes or (lambda arch, tokenizer, config: ()))


def export_format(config) -> ExportFormat:
    return REGISTRY[config.export_format]


def check(arch, model_config, tokenizer, config) -> None:
    """Refuse an architecture the run's --format cannot hold (the message says what to change)."""
    entry = export_format(config)
    if entry.check is not None:
        entry.check(arch, model_config, tokenizer, config)


def notes(arch, tokenizer, config) -> tuple[str, ...]:
    return export_format(config).notes(arch, tokenizer, config)


def write(model, arch, tokenizer, out: Path, card, config, force: bool) -> Path:
    return export_format(config).write(model, arch, tokenizer, out, card, config, force)


def _gguf_block(config) -> int:
    return block_size(config.gguf_type) if config.gguf_type in GGUF_TYPES else 1


def _gguf_notes(arch, tokenizer, config) -> tuple[str, ...]:
    notes, padding = [], padding_bytes(arch, config.gguf_type)
    if padding:
        notes.append(f"FFN widths padded with zero channels to whole GGUF {config.gguf_type} blocks of "
                     f"{_gguf_block(config)}: {padding / 2**20:.2f} MiB more in the file, the same outputs (search "
                     f"with --ffn-step {_gguf_block(config)} to avoid it)")
    if left_out := tokens_left_out(tokenizer, arch.spec.vocab_size):
        notes.append(f"{len(left_out)} added tokens past the model's {arch.spec.vocab_size:,} embeddings are left "
                     f"out of the GGUF vocabulary (they have no embedding, so were never trained): "
                     + ", ".join(left_out[:5]) + (", ..." if len(left_out) > 5 else ""))
    return tuple(notes)


register_export_format(
    name="hf", file_name="model",
    write=lambda model, arch, tokenizer, out, card, config, force: export_model(model, arch, tokenizer, out, card,
                                                                                force=force))
register_export_format(
    name="gguf", file_name="model.gguf", ffn_block=_gguf_block,
    write=lambda model, arch, tokenizer, out, card, config, force: export_gguf(model, arch, tokenizer, out,
                                                                               config.gguf_type, force=force),
    check=lambda arch, model_config, tokenizer, config: check_export(arch, model_config, tokenizer,
                                                                     config.gguf_type),
    notes=_gguf_notes)
