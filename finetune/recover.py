"""Recover a sliced model with LoRA (peft), optionally distilling from the dense model, then merge.

    W' = W + (α / r) · B A        A: (r, in), B: (out, r), B = 0 at the start

on every linear projection of the decoder (peft's "all-linear": q/k/v/o and
gate/up/down; never the LM head), trained on

    loss = (1 - λ) · NLL(labels) + λ · τ² · KL(teacher || student)      (λ = distill_weight)

(both means over the labelled tokens; see finetune.losses for the bucketed KL and
the chunked LM head, whose gradient is computed in closed form)
with rows drawn from the training domains by dynamic batch loading (one domain:
plain shuffled passes). At the end `merge_and_unload` folds B A into W, so the
returned model is the same module tree as the input with the same parameter count.

With `validation` data, recovery selects on it: its loss (`finetune.evaluate.validation_loss`:
perplexity, or minus the task margin when it holds task examples) is measured before the
first step (the sliced model: B = 0) and every `eval_every` steps, and the adapters
of the lowest one are kept. When no step beats the sliced model, the adapters are
removed unmerged, so the result is the sliced model, bit for bit: recovery never
makes the validation loss worse. (Held-out data may still disagree; callers
report both.)
On CUDA: bf16 autocast (weights keep their dtype) and, unless the config says
otherwise, gradient checkpointing (each decoder layer recomputed in backward).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from finetune.data import IGNORE, Domain
from finetune.distill import DenseReference
from finetune.dynamic import DomainSampler
from finetune.evaluate import EvalData, Evaluation, evaluate, validation_loss
from finetune.losses import recovery_loss
from pruning.topk import TopKDistribution


class RecoveryConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RecoveryConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-4
    warmup_ratio: float = 0.05  # share of the steps with a linear LR warm-up (then cosine decay)
    rank: int = 8
    alpha: float = 16.0
    # peft's default: recovery sees each row about once (50 steps of 8 rows drawn from 400), so dropout regularises
    # nothing, and on SmolLM2 at 70% (2 CPU threads) it made a step 1.57x slower (13.1 s against 8.4 s)
    dropout: float = 0.0
    max_grad_norm: float = 1.0
    distill_weight: float = 0.0  # λ; needs a DenseReference with teacher targets (top_k > 0)
    domain_eta: float = 1.0  # dynamic batch loading step size η (used with several domains)
    domain_update_every: int = 10
    gradient_checkpointing: bool | None = None  # None: on CUDA only (recompute each layer in backward)
    # steps between validation checks; None: a fifth of the steps (on SmolLM2 at 30% removed the search windows'
    # perplexity fell at each of 11 checks of 50 steps, so the five between the fifths chose nothing and cost 60 s)
    eval_every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "rank", "domain_update_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecoveryConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise RecoveryConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        for name in ("lr", "alpha", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise RecoveryConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise RecoveryConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.distill_weight <= 1:
            raise RecoveryConfigError(f"distill_weight (the KL share of the loss) must be in [0, 1], "
                                      f"got {self.distill_weight!r}")
        if not (self.gradient_checkpointing is None or isinstance(self.gradient_checkpointing, bool)):
            raise RecoveryConfigError(f"gradient_checkpointing must be True, False or None (on CUDA only), "
                                      f"got {self.gradient_checkpointing!r}")
        if self.eval_every is not None and (isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int)
                                            or self.eval_every < 1):
            raise RecoveryConfigError(f"eval_every must be a positive integer or None, got {self.eval_every!r}")
        if not self.domain_eta >= 0:
            raise RecoveryConfigError(f"domain_eta must be >= 0 (0 keeps the domain mix fixed), "
                                      f"got {self.domain_eta!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def validation_steps(self) -> set[int]:
        """Steps after which the validation data is measured (0: the sliced model; the last step always)."""
        every = self.eval_every or max(1, self.steps // 5)
        return {0, *range(every, self.steps + 1, every), self.steps}

    @classmethod
    def from_dict(cls, data: dict) -> RecoveryConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise RecoveryConfigError(f"unknown recovery settings {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class RecoveryResult:
    """What recovery did: per-step training loss, domain weights after each update, metrics before/after."""

    steps: int
    losses: tuple[float, ...]
    domains: tuple[str, ...]
    domain_weights: tuple[tuple[float, ...], ...]  # initial weights first
    trainable_params: int
    seconds: float
    before: Evaluation | None
    after: Evaluation | None
    validation: tuple[tuple[int, float], ...] = ()  # (step, validation loss); step 0 is the sliced model
    selected_step: int | None = None  # the step whose adapters were kept (0: none, the sliced model)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["before"] = self.before.to_dict() if self.before else None
        out["after"] = self.after.to_dict() if self.after else None
        return out


def _check_inputs(domains: Sequence[Domain], config: RecoveryConfig, reference: DenseReference | None) -> None:
    names = [d.name for d in domains]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"give at least one training domain, with unique names; got {names}")
    if (len(domains) > 1 or config.distill_weight > 0) and reference is None:
        raise ValueError("several domains and distillation need the dense model's reference: "
                         "compute finetune.distill.dense_reference(dense_model, domains, ...) before slicing")
    if reference is not None and set(reference.losses) != set(names):
        raise ValueError(f"the dense reference covers {sorted(reference.losses)}, the training domains are {names}")
    if config.distill_weight > 0 and set(reference.targets) != set(names):
        raise ValueError("distill_weight > 0 needs teacher targets: call dense_reference(..., top_k=32) or similar")


def recover(model: PreTrainedModel, domains: Sequence[Domain], config: RecoveryConfig,
            evaluation: EvalData | None = None, reference: DenseReference | None = None,
            progress: bool = True, validation: EvalData | None = None) -> tuple[PreTrainedModel, RecoveryResult]:
    """LoRA-tune `model` (in place) on `domains`, merge the adapters and return it with a `RecoveryResult`.

    `evaluation` is measured before and after; `reference` (from the dense model,
    before slicing) is needed for several domains and for distillation; with
    `validation`, the best state on it is kept (see the module docstring).
    """
    _check_inputs(domains, config, reference)
    before = evaluate(model, evaluation) if evaluation is not None else None
    start = time.perf_counter()
    trainable = _Trainer(model, domains, config, reference, validation)
    try:
        losses = trainable.run(progress)
    except BaseException:
        trainable.discard()  # hand back the model as it came, not half-wrapped
        raise
    selected = trainable.select_best()
    model = trainable.merge() if selected > 0 else trainable.discard()
    seconds = time.perf_counter() - start
    after = evaluate(model, evaluation) if evaluation is not None else None
    result = RecoveryResult(config.steps, tuple(losses), tuple(d.name for d in domains),
                            tuple(trainable.sampler.history), trainable.trainable_params, seconds, before, after,
                            tuple(trainable.checks), selected)
    return model, result


class _Trainer:
    """The LoRA training loop; owns the peft wrapper between construction and `merge`."""

    def __init__(self, model: PreTrainedModel, domains: Sequence[Domain], config: RecoveryConfig,
                 reference: DenseReference | None, validation: EvalData | None = None):
        self.domains, self.config, self.reference, self.validation = domains, config, reference, validation
        self.checks: list[tuple[int, float]] = []  # (step, validation loss)
        self.best: tuple[float, int, list[torch.Tensor]] | None = None  # (loss, step, trainable tensors)
        self.device = next(model.parameters()).device
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        torch.manual_seed(config.seed)
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft 0.21 probes a property transformers 5 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.peft = get_peft_model(model, lora)
        self.cuda = self.device.type == "cuda"
        self.checkpointing = self.cuda if config.gradient_checkpointing is None else config.gradient_checkpointing
        if self.checkpointing:
            self.peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = [p for p in self.peft.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.schedule = get_cosine_schedule_with_warmup(self.optimizer, round(config.warmup_ratio * config.steps),
                                                        config.steps)
        ref = [reference.losses[d.name] for d in domains] if reference else [0.0]
        self.sampler = DomainSampler([len(d) for d in domains], ref, config.domain_eta,
                                     config.domain_update_every, config.seed)

    def run(self, progress: bool) -> list[float]:
        losses = []
        checked = self.config.validation_steps()
        self._validate(0)
        self.peft.train()
        bar = tqdm(range(1, self.config.steps + 1), desc="recovery", disable=not progress)
        for step in bar:
            loss = self._step(self.sampler.sample(self.config.batch_size))
            losses.append(loss)
            self.sampler.step(step)
            if step in checked:
                self._validate(step)
            bar.set_postfix(loss=f"{loss:.4f}", **({"val": f"{self.checks[-1][1]:.3f}"} if self.checks else {}))
        return losses

    def _validate(self, step: int) -> None:
        """Measure the validation loss now; keep a copy of the adapters when it is the lowest so far."""
        if self.validation is None:
            return
        loss = validation_loss(self.peft.get_base_model(), self.validation, self.config.batch_size)
        self.checks.append((step, loss))
        if self.best is None or loss < self.best[0]:
            self.best = (loss, step, [p.detach().clone() for p in self.params])

    def select_best(self) -> int:
        """Put the best validated adapters back; return their step (the last step without validation data)."""
        if self.best is None:
            return self.config.steps
        _, step, tensors = self.best
        with torch.no_grad():
            for p, best in zip(self.params, tensors, strict=True):
                p.copy_(best)
        return step

    def _step(self, picks: list[tuple[int, int]]) -> float:
        batch, teacher, owners = self._batch(picks)
        base = self.peft.get_base_model()  # LoRA layers are injected in place, so its decoder trains them
        tau = self.reference.temperature if teacher else 1.0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        use_cache=False).last_hidden_state  # (B, W, H)
            out = recovery_loss(hidden, base.get_output_embeddings(), batch["labels"], teacher, tau,
                                self.config.distill_weight)
        if not math.isfinite(out.loss.item()):
            raise FloatingPointError("recovery loss is not finite; lower lr or check the training data")
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        for d, row_nll, row_tokens in zip(owners, out.nll.tolist(), out.tokens.tolist(), strict=True):
            self.sampler.observe(d, row_nll, row_tokens)
        return out.loss.item()

    def _batch(self, picks: list[tuple[int, int]]):
        """Rows of the picked (domain, row) pairs, right-padded to one width, with their teacher targets."""
        width = max(self.domains[d].input_ids.shape[1] for d, _ in picks)
        rows = [self.domains[d].rows(torch.tensor([r])) for d, r in picks]
        pads = {"input_ids": 0, "labels": IGNORE, "attention_mask": 0}
        batch = {k: torch.cat([_pad(x[k], width, v) for x in rows]).to(self.device) for k, v in pads.items()}
        teacher = self._teacher(picks, width) if self.config.distill_weight > 0 else None
        return batch, teacher, [d for d, _ in picks]

    def _teacher(self, picks: list[tuple[int, int]], width: int) -> TopKDistribution:
        """Teacher targets of the picked rows, right-padded to `width - 1` next-token positions."""
        owners = [self.reference.targets[self.domains[d].name] for d, _ in picks]

        def stack(field: str) -> torch.Tensor:
            rows = [_pad(getattr(t, field)[r : r + 1], width - 1, 0) for t, (_, r) in zip(owners, picks, strict=True)]
            return torch.cat(rows).to(self.device)

        return TopKDistribution(stack("top_logp"), stack("top_ids"), stack("rest_logp"))

    def merge(self) -> PreTrainedModel:
        """Fold every B A into its W and remove the adapters."""
        return self._restore(self.peft.merge_and_unload())

    def discard(self) -> PreTrainedModel:
        """Remove the adapters without merging (the weights are as before training)."""
        return self._restore(self.peft.unload())

    def _restore(self, model: PreTrainedModel) -> PreTrainedModel:
        if self.checkpointing:
            model.gradient_checkpointing_disable()
        for n, p in model.named_parameters():
            p.requires_grad_(self.requires_grad[n])
        return model.eval()


def _pad(x: torch.Tensor, width: int, value) -> torch.Tensor:
    """Right-pad dim 1 of `x` to `width` with `value`."""
    extra = width - x.shape[1]
    if extra == 0:
        return x
    shape = (x.shape[0], extra, *x.shape[2:])
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype)], dim=1)
