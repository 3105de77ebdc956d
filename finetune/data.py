"""Training data for recovery: named domains of fixed-width token rows with a loss mask.

A `Domain` is (N, T) input ids, labels and attention mask. Language-modelling
domains are token windows with every position labelled. Task domains follow
Tailored-LLaMA: each example is rendered with a prompt template after N
few-shot examples (prompt + answer) drawn deterministically from a pool, and only
the answer tokens carry a label; prompt and padding positions are -100.

Task JSONL: one object per line; `template` is a `str.format` pattern over its
fields (e.g. "Question: {question}\\nAnswer:"), the answer is `answer_field`
(a string, or an index into the options) and the options, when present, are
`options_field` (a list of strings; used for accuracy by option log-likelihood).
The continuation the model must produce is `answer_prefix + answer` (" Paris").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pruning.data import read_text, token_windows

IGNORE = -100  # label of positions without loss (the convention of transformers and F.cross_entropy)
SHOT_SEPARATOR = "\n\n"
HELD_OUT_SHARE = 0.2  # of a task's examples: what summaries and cards report; no search or recovery sees them


class TaskDataError(ValueError):
    pass


@dataclass(frozen=True)
class Domain:
    """One named training source: input_ids, labels, attention_mask all (N, T); labels IGNORE where no loss."""

    name: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        shapes = {self.input_ids.shape, self.labels.shape, self.attention_mask.shape}
        if len(shapes) != 1 or self.input_ids.dim() != 2 or len(self.input_ids) == 0:
            raise ValueError(f"domain {self.name!r}: ids, labels and mask must share one non-empty (N, T) shape, "
                             f"got {sorted(map(tuple, shapes))}")
        if not (self.labels[:, 1:] != IGNORE).any(dim=1).all():
            raise ValueError(f"domain {self.name!r}: some rows have no labelled token after the first position; "
                             "make the sequence length larger than the prompts")

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch of rows as model keyword arguments (plus labels)."""
        return {"input_ids": self.input_ids[index], "labels": self.labels[index],
                "attention_mask": self.attention_mask[index]}


def lm_domain(name: str, windows: torch.Tensor) -> Domain:
    """A language-modelling domain from (N, T) token windows (pruning.data.token_windows)."""
    return Domain(name, windows, windows.clone(), torch.ones_like(windows))


def text_domain(name: str, tokenizer, source: str | Path, seq_len: int, max_windows: int | None = None) -> Domain:
    """A language-modelling domain from a text file, a directory of text files or a hub corpus name."""
    text = read_text(source)
    return lm_domain(name, token_windows(tokenizer, text, seq_len, max_windows, what=f"text of domain {name!r}"))


@dataclass(frozen=True)
class TaskExample:
    """A rendered example: the model reads `prompt` and should continue with `answer` (one of `options`, if any)."""

    prompt: str
    answer: str
    options: tuple[str, ...] = ()
    prefix: str = ""  # the answer prefix every continuation starts with (not counted in acc_norm's lengths)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        if self.options and self.answer not in self.options:
            raise TaskDataError(f"answer {self.answer!r} is not one of the options {self.options}")

    @property
    def answer_index(self) -> int:
        return self.options.index(self.answer)


@dataclass(frozen=True)
class TaskFormat:
    """How JSONL rows become `TaskExample`s."""

    template: str
    answer_field: str = "answer"
    options_field: str = "options"
    answer_prefix: str = " "

    def example(self, row: dict, where: str = "row") -> TaskExample:
        """Render one row; `where` names it in error messages ("file.jsonl:3")."""
        try:
            prompt = self.template.format(**row)
            answer = row[self.answer_field]
        except (KeyError, IndexError) as err:
            raise TaskDataError(f"{where}: field {err} is missing (template {self.template!r}, "
                                f"answer field {self.answer_field!r}); fix the row or the template") from err
        options = [str(x) for x in row.get(self.options_field, [])]
        if isinstance(answer, int) and not isinstance(answer, bool):
            if not 0 <= answer < len(options):
                raise TaskDataError(f"{where}: answer index {answer} but {len(options)} options")
            answer = options[answer]
        p = self.answer_prefix
        return TaskExample(prompt, p + str(answer), tuple(p + x for x in options), p)


def read_task_jsonl(path: str | Path, fmt: TaskFormat) -> tuple[TaskExample, ...]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if text.strip():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    raise TaskDataError(f"{path}:{line}: not JSON ({err.msg})") from err
                examples.append(fmt.example(row, f"{path}:{line}"))
    if not examples:
        raise TaskDataError(f"{path} holds no examples")
    return tuple(examples)


def split_examples(examples: tuple[TaskExample, ...], held_out: float, seed: int = 0):
    """(train, held_out) by a seeded permutation; `held_out` is the evaluation share, in (0, 1)."""
    if not 0 < held_out < 1:
        raise TaskDataError(f"the held-out share must be in (0, 1), got {held_out}")
    n_eval = max(1, round(held_out * len(examples)))
    if n_eval >= len(examples):
        raise TaskDataError(f"{len(examples)} examples are too few to hold {held_out:.0%} out; give more examples")
    order = np.random.default_rng(seed).permutation(len(examples))
    train, held = sorted(order[n_eval:]), sorted(order[:n_eval])
    return tuple(examples[i] for i in train), tuple(examples[i] for i in held)


def read_task_split(path: str | Path, fmt: TaskFormat, seed: int = 0, held_out: float = HELD_OUT_SHARE,
                    check: Callable[[tuple[TaskExample, ...]], None] | None = None):
    """(training, held-out) examples of a task JSONL: `read_task_jsonl`, then `split_examples`.

    The split is a function of the file, `held_out` and `seed` only, so the search, the export and the
    checks before a run all see the same examples on each side. `check` sees every example in file
    order before the split and raises what its caller cannot use (e.g. an example without options).
    """
    examples = read_task_jsonl(path, fmt)
    if check is not None:
        check(examples)
    return split_examples(examples, held_out, seed)


def shot_indices(n_pool: int, shots: int, seed: int, index: int, exclude_self: bool) -> list[int]:
    """Indices of the few-shot examples of example `index`: a function of (seed, index) only.

    Drawn without replacement from range(n_pool), minus `index` itself when the pool
    is the example's own set.
    """
    candidates = [i for i in range(n_pool) if not (exclude_self and i == index)]
    rng = np.random.default_rng([seed, index])
    k = min(shots, len(candidates))
    return [candidates[i] for i in rng.choice(len(candidates), size=k, replace=False)]


def few_shot_context(example: TaskExample, shots: list[TaskExample]) -> str:
    return SHOT_SEPARATOR.join([*(s.prompt + s.answer for s in shots), example.prompt])


@dataclass(frozen=True)
class EncodedTask:
    """Token ids of one example: the few-shot context and each continuation (the answer first)."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]  # (answer, *options) or (answer,)
    label: int  # index into continuations[1:] of the right option; -1 without options
    option_chars: tuple[int, ...] = ()  # characters of each option without the prefix (lm-eval's acc_norm length)


def encode_tasks(tokenizer, examples: tuple[TaskExample, ...], max_len: int, shots: int = 0, seed: int = 0,
                 pool: tuple[TaskExample, ...] | None = None) -> tuple[EncodedTask, ...]:
    """Tokenise each example after its few-shot context, dropping the earliest shots until it fits `max_len`.

    `pool` is where shots come from (default: `examples` themselves, never an example
    as its own shot); evaluation examples should draw from the training pool.
    """
    own = pool is None
    pool = examples if own else pool
    encoded = []
    for i, ex in enumerate(examples):
        chosen = [pool[j] for j in shot_indices(len(pool), shots, seed, i, exclude_self=own)]
        conts = [_ids(tokenizer, c, special=False) for c in (ex.answer, *ex.options)]
        room = max_len - max(len(c) for c in conts)
        context = _ids(tokenizer, few_shot_context(ex, chosen), special=True)
        while len(context) > room and chosen:
            chosen = chosen[1:]
            context = _ids(tokenizer, few_shot_context(ex, chosen), special=True)
        if len(context) > room or not context:
            raise TaskDataError(f"example {i}: the prompt ({len(context)} tokens) and answer do not fit in "
                                f"{max_len} tokens even without shots; raise the sequence length")
        chars = tuple(len(o) - len(ex.prefix) for o in ex.options)
        encoded.append(EncodedTask(tuple(context), tuple(conts), ex.answer_index if ex.options else -1, chars))
    return tuple(encoded)


def _ids(tokenizer, text: str, special: bool) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=special)["input_ids"])


def task_domain(name: str, encoded: tuple[EncodedTask, ...], pad_id: int) -> Domain:
    """Rows context + answer, right-padded to the longest; labels only on the answer tokens."""
    width = max(len(e.context) + len(e.continuations[0]) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(encoded):
        c, a = len(e.context), len(e.continuations[0])
        ids[r, : c + a] = torch.tensor(e.context + e.continuations[0])
        labels[r, c : c + a] = torch.tensor(e.continuations[0])
        mask[r, : c + a] = 1
    return Domain(name, ids, labels, mask)


def pad_id(tokenizer) -> int:
    """The padding id (positions are masked out, so any valid id works when there is none)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0
