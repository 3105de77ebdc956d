"""Held-out evaluation before and after recovery: perplexity, and task accuracy by option log-likelihood.

Accuracy follows the lm-evaluation-harness rules: an example is right ("acc") when
its answer is the option with the largest summed log-probability

    score(o) = Σ_{t ∈ o} log p(o_t | context, o_<t)

given the same few-shot context; "acc_norm" takes the largest score(o) / len(o), len
in characters without the answer prefix (lm-eval's completion length). Accuracy on a few
dozen examples moves in steps, so `task_scores` also gives a smooth companion, the margin

    margin = mean over examples of  score(answer) - max_{o != answer} score(o)

which is positive exactly where "acc" counts the example right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from finetune.data import EncodedTask
from pruning.metrics import perplexity


@dataclass(frozen=True)
class EvalData:
    """Held-out evaluation: (N, T) text windows, and encoded task examples with options (may be empty)."""

    windows: torch.Tensor
    tasks: tuple[EncodedTask, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.windows.dim() != 2 or len(self.windows) == 0:
            raise ValueError(f"evaluation windows must be a non-empty (N, T) tensor, got {tuple(self.windows.shape)}")
        if any(t.label < 0 for t in self.tasks):
            raise ValueError("evaluation task examples need options (and the answer among them) to score accuracy")


@dataclass(frozen=True)
class Evaluation:
    perplexity: float
    task_accuracy: float | None = None

    def to_dict(self) -> dict[str, float]:
        out = {"perplexity": self.perplexity}
        if self.task_accuracy is not None:
            out["task_accuracy"] = self.task_accuracy
        return out


def evaluate(model: PreTrainedModel, data: EvalData, batch_size: int = 8, progress: str | None = None) -> Evaluation:
    """`progress`: a label for the perplexity's progress bar (none without)."""
    was_training = model.training
    model.eval()
    try:
        ppl = perplexity(model, data.windows, batch_size=batch_size, progress=progress)
        accuracy = option_accuracy(model, data.tasks, batch_size) if data.tasks else None
    finally:
        model.train(was_training)
    return Evaluation(ppl, accuracy)


def validation_loss(model: PreTrainedModel, data: EvalData, batch_size: int = 8) -> float:
    """What recovery selects on, lower is better: with task examples, minus their mean margin (the task is what
    the user tunes for, and the margin moves where accuracy on a few dozen examples stays put); else the
    windows' perplexity."""
    was_training = model.training
    model.eval()
    try:
        if data.tasks:
            return -task_scores(model, data.tasks, batch_size).margin
        return perplexity(model, data.windows, batch_size=batch_size)
    finally:
        model.train(was_training)


def validation_metric(data: EvalData) -> str:
    """The name of what `validation_loss` measures on `data`."""
    return "-task margin" if data.tasks else "perplexity"


@dataclass(frozen=True)
class TaskScores:
    """lm-eval's acc and acc_norm over the examples, and the mean log-likelihood margin of the answer."""

    acc: float
    acc_norm: float
    margin: float


def option_accuracy(model: PreTrainedModel, tasks: tuple[EncodedTask, ...], batch_size: int = 8) -> float:
    """Fraction of `tasks` whose highest-scoring option is the answer."""
    return task_scores(model, tasks, batch_size).acc


def task_scores(model: PreTrainedModel, tasks: tuple[EncodedTask, ...], batch_size: int = 8) -> TaskScores:
    """acc, acc_norm and margin (module docstring) of `tasks`, each needing options and a label."""
    if not tasks or any(t.label < 0 or len(t.continuations) < 3 for t in tasks):
        raise ValueError("task scores need examples with at least two options and the answer among them")
    acc, acc_norm, margin = [], [], []
    for t, ll in zip(tasks, option_loglikelihoods(model, tasks, batch_size), strict=True):
        others = np.delete(ll, t.label)
        acc.append(ll.argmax() == t.label)
        chars = np.array(t.option_chars or [1] * len(ll), dtype=float)
        acc_norm.append((ll / np.maximum(chars, 1)).argmax() == t.label)
        margin.append(ll[t.label] - others.max())
    return TaskScores(float(np.mean(acc)), float(np.mean(acc_norm)), float(np.mean(margin)))


def option_loglikelihoods(model: PreTrainedModel, tasks: tuple[EncodedTask, ...],
                          batch_size: int = 8) -> list[np.ndarray]:
    """Per example, (n_options,) float64 summed log-probabilities score(o) of its options."""
    pairs = [(t.context, opt) for t in tasks for opt in t.continuations[1:]]
    scores = torch.cat([_scores(model, pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size)])
    scores = scores.double().numpy()
    out, start = [], 0
    for t in tasks:
        n = len(t.continuations) - 1
        out.append(scores[start : start + n])
        start += n
    return out


@torch.inference_mode()
def _scores(model: PreTrainedModel, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> torch.Tensor:
    """Summed log-probability of each continuation after its context: (len(pairs),)."""
    device = next(model.parameters()).device
    width = max(len(c) + len(o) for c, o in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)  # positions holding continuation tokens
    for r, (c, o) in enumerate(pairs):
        ids[r, : len(c) + len(o)] = torch.tensor(c + o)
        mask[r, : len(c) + len(o)] = 1
        target[r, len(c) : len(c) + len(o)] = True
    ids, mask, target = ids.to(device), mask.to(device), target.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, W-1, V)
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, W-1): log p(token t+1)
    return (logp * target[:, 1:]).sum(1).cpu()
