"""Text sources and fixed-length token windows for calibration, evaluation and tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl"}
# Named corpora for users with internet (datasets installed): name -> (path, config, text column, splits),
# splits mapping the split asked for ("train" for calibration, "test" for evaluation) to the corpus's own
HUB_CORPORA = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", {"train": "train", "test": "test"}),
    "c4": ("allenai/c4", "en", "text", {"train": "train", "test": "validation"}),  # C4 has no test split
}


class DataError(ValueError):
    pass


def read_text(source: str | Path, split: str = "train") -> str:
    """Text of a local file, of all text files under a directory (sorted), or of a named hub corpus."""
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if str(source) in HUB_CORPORA:
        return _hub_text(str(source), split)
    raise DataError(
        f"no such file or directory: {source!r}; give a text file, a directory of text files, "
        f"or one of {', '.join(HUB_CORPORA)} (needs internet and `pip install datasets`)"
    )


def _hub_text(name: str, split: str) -> str:
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{name!r} needs the datasets package: pip install 'prunesearch[datasets]'") from err
    path, config, column, splits = HUB_CORPORA[name]
    rows = datasets.load_dataset(path, config, split=splits[split], streaming=name == "c4")
    if name == "c4":
        rows = (r for _, r in zip(range(20000), rows, strict=False))
    return "\n\n".join(r[column] for r in rows)


def evenly_spaced(total: int, n: int) -> torch.Tensor:
    """(min(n, total),) indices spread evenly over range(total), first and last included."""
    return torch.linspace(0, total - 1, min(n, total)).round().long().unique()


def token_windows(
    tokenizer, text: str, seq_len: int, max_windows: int | None = None, what: str = "text"
) -> torch.Tensor:
    """(N, seq_len) non-overlapping windows of the tokenised text; at most `max_windows`, evenly spread."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long on purpose: no warning
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(
            f"the {what} has {len(ids)} tokens, fewer than one window of {seq_len}; "
            "give more text or a shorter --seq-len"
        )
    windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
    if max_windows is not None and n > max_windows:
        windows = windows[torch.as_tensor(np.linspace(0, n - 1, max_windows).round().astype(np.int64))]
    return windows
