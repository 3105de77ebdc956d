"""LoRA recovery on tiny sliced models: loss falls, adapters merge away, shapes and counts are kept."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from finetune import recover as recover_module
from finetune.data import TaskFormat, encode_tasks, lm_domain, task_domain
from finetune.distill import dense_reference
from finetune.evaluate import EvalData, evaluate
from finetune.recover import RecoveryConfig, RecoveryConfigError, recover
from pruning import adapter
from pruning.architecture import Architecture, LayerShape
from pruning.importance import compute_importance
from pruning.slicing import slice_model
from tests.finetune.conftest import char_model, char_tokenizer

SHAPES = (LayerShape(1, 2, 13), LayerShape(0, 0, 40), LayerShape(2, 1, 0))
FAST = dict(batch_size=4, lr=1e-2, warmup_ratio=0.0, domain_update_every=5)


def pattern_windows(n: int = 8, width: int = 16) -> torch.Tensor:
    """Windows of a period-7 token pattern at different offsets: easy to learn, hard to know untrained."""
    return (torch.arange(width)[None, :] + torch.arange(n)[:, None]) % 7 + 10


def sliced(family: str = "llama"):
    model = char_model(family)
    calibration = pattern_windows()
    arch = Architecture(adapter.model_spec(model), SHAPES)
    return model, arch, compute_importance(model, calibration)


def test_recovery_lowers_loss_and_merges_back_to_the_sliced_model():
    model, arch, importance = sliced()
    slice_model(model, arch, importance)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    windows = pattern_windows()
    out, result = recover(model, [lm_domain("text", windows)], RecoveryConfig(steps=20, **FAST),
                          evaluation=EvalData(windows), progress=False)
    assert out is model and type(out) is LlamaForCausalLM
    assert not any("lora" in name.lower() for name, _ in out.named_modules())
    assert sum(p.numel() for p in out.parameters()) == arch.params()
    assert {n: p.shape for n, p in out.named_parameters()} == {n: p.shape for n, p in before.items()}
    assert all(p.requires_grad for p in out.parameters()) and out.training is False
    changed = [n for n, p in out.named_parameters() if not torch.equal(p, before[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" not in changed
    assert sum(result.losses[-5:]) < 0.9 * sum(result.losses[:5])
    assert result.after.perplexity < 0.5 * result.before.perplexity
    assert len(result.losses) == result.steps == 20
    assert result.domain_weights == ((1.0,),) * 5
    assert result.trainable_params == sum(8 * (m.in_features + m.out_features) for m in _linears(before_model=arch))
    json.dumps(result.to_dict())


def _linears(before_model: Architecture):
    """The nn.Linear shapes LoRA adapts in a model sliced to SHAPES (hidden 48, head_dim 8)."""
    shapes = []
    for x in before_model.layers:
        if x.kv_heads:
            q, kv = x.query_heads * 8, x.kv_heads * 8
            shapes += [torch.nn.Linear(48, q), torch.nn.Linear(48, kv), torch.nn.Linear(48, kv), torch.nn.Linear(q, 48)]
        if x.ffn_channels:
            f = x.ffn_channels
            shapes += [torch.nn.Linear(48, f), torch.nn.Linear(48, f), torch.nn.Linear(f, 48)]
    return shapes


def test_recovery_is_deterministic_for_a_seed():
    runs = []
    for _ in range(2):
        model, arch, importance = sliced("qwen2")
        slice_model(model, arch, importance)
        _, result = recover(model, [lm_domain("text", pattern_windows())], RecoveryConfig(steps=4, **FAST),
                            progress=False)
        runs.append(result.losses)
    assert runs[0] == runs[1]


def test_gradient_checkpointing_changes_memory_not_results():
    runs = []
    for checkpointing in (False, True):
        model, arch, importance = sliced("mistral")
        slice_model(model, arch, importance)
        config = RecoveryConfig(steps=3, gradient_checkpointing=checkpointing, **FAST)
        out, result = recover(model, [lm_domain("text", pattern_windows())], config, progress=False)
        runs.append((result.losses, [p.detach().clone() for p in out.parameters()]))
        assert out.is_activation_checkpointing is False
    assert runs[1][0] == pytest.approx(runs[0][0], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_distillation_and_dynamic_batch_loading_over_text_and_task_domains():
    tok = char_tokenizer()
    fmt = TaskFormat(template="{q}=")
    rows = [{"q": f"{a}+{b}", "answer": str(a + b)} for a in range(4) for b in range(4)]
    encoded = encode_tasks(tok, tuple(fmt.example(r) for r in rows), max_len=40, shots=2, seed=0)
    domains = [lm_domain("text", pattern_windows()), task_domain("arith", encoded, tok.pad_token_id)]
    model, arch, importance = sliced()
    reference = dense_reference(model, domains, top_k=8, temperature=2.0)  # before slicing
    slice_model(model, arch, importance)
    config = RecoveryConfig(steps=20, distill_weight=0.5, **FAST)
    out, result = recover(model, domains, config, reference=reference, progress=False)
    assert sum(p.numel() for p in out.parameters()) == arch.params()
    assert result.domains == ("text", "arith")
    assert len(result.domain_weights) == 1 + 20 // 5
    assert result.domain_weights[0] == (0.5, 0.5)
    assert all(sum(w) == pytest.approx(1.0, abs=1e-12) for w in result.domain_weights)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])


def test_validation_keeps_the_best_checked_state():
    model, arch, importance = sliced()
    slice_model(model, arch, importance)
    windows = pattern_windows()
    config = RecoveryConfig(steps=20, eval_every=5, **FAST)
    out, result = recover(model, [lm_domain("text", windows)], config, evaluation=EvalData(windows),
                          progress=False, validation=EvalData(windows[:4]))
    steps, ppls = zip(*result.validation, strict=True)
    assert steps == (0, 5, 10, 15, 20)
    best = min(range(len(ppls)), key=ppls.__getitem__)
    assert result.selected_step == steps[best] > 0
    # the kept adapters are the measured ones: the merged model scores what was measured at that step
    assert recover_module.evaluate(out, EvalData(windows[:4]), 4).perplexity == pytest.approx(ppls[best], rel=1e-4)


def test_validation_with_task_examples_selects_on_their_margin():
    from finetune.evaluate import task_scores

    tok = char_tokenizer()
    fmt = TaskFormat(template="{q}=")
    rows = [{"q": f"{a}{b}", "answer": str(a), "options": [str(d) for d in range(10)]}  # copy the first digit
            for a in range(10) for b in range(3)]
    encoded = encode_tasks(tok, tuple(fmt.example(r) for r in rows), max_len=40, shots=2, seed=0)
    validation = EvalData(pattern_windows()[:2], encoded[:8])
    model, arch, importance = sliced()
    slice_model(model, arch, importance)
    sliced_margin = task_scores(model, validation.tasks, 4).margin
    config = RecoveryConfig(steps=20, eval_every=5, **FAST)
    # validated on examples it tunes on: this checks what is selected, not how well it generalises
    out, result = recover(model, [task_domain("arith", encoded, tok.pad_token_id)], config, progress=False,
                          validation=validation)
    steps, losses = zip(*result.validation, strict=True)
    assert steps == (0, 5, 10, 15, 20)
    assert losses[0] == pytest.approx(-sliced_margin, rel=1e-6)  # the loss is minus the margin, not perplexity
    best = min(range(len(losses)), key=losses.__getitem__)
    assert result.selected_step == steps[best] > 0
    assert -task_scores(out, validation.tasks, 4).margin == pytest.approx(losses[best], rel=1e-4, abs=1e-4)


def test_recovery_that_only_hurts_validation_hands_back_the_sliced_model():
    model, arch, importance = sliced()
    slice_model(model, arch, importance)
    learned = pattern_windows() + 30  # tokens 40..46, which the model first learns well
    model, _ = recover(model, [lm_domain("learned", learned)], RecoveryConfig(steps=30, **FAST), progress=False)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = RecoveryConfig(steps=10, eval_every=2, **FAST)  # then tuning on tokens 10..16 only costs it
    out, result = recover(model, [lm_domain("text", pattern_windows())], config, evaluation=EvalData(learned),
                          progress=False, validation=EvalData(learned))
    assert result.selected_step == 0
    assert all(ppl > result.validation[0][1] for _, ppl in result.validation[1:])
    assert not any("lora" in name.lower() for name, _ in out.named_modules())
    assert all(torch.equal(p, state[n]) for n, p in out.named_parameters())
    assert result.after.perplexity == result.before.perplexity


def test_without_validation_the_last_step_is_kept():
    model, arch, importance = sliced()
    slice_model(model, arch, importance)
    _, result = recover(model, [lm_domain("text", pattern_windows())], RecoveryConfig(steps=3, **FAST),
                        progress=False)
    assert (result.selected_step, result.validation) == (3, ())


def test_a_non_finite_loss_stops_recovery_and_hands_back_the_model_unchanged():
    model, arch, importance = sliced()
    slice_model(model, arch, importance)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    windows = pattern_windows()
    before = EvalData(windows)
    sliced_ppl = evaluate(model, before).perplexity
    # AdamW moves each adapter weight by about lr per step: at lr 1e20 the first step's finite loss is followed by
    # adapters of size 1e20 and a loss that overflows to inf/nan on a following step
    config = RecoveryConfig(steps=5, **{**FAST, "lr": 1e20})
    with pytest.raises(FloatingPointError, match="recovery loss is not finite; lower lr or check the training data"):
        recover(model, [lm_domain("text", windows)], config, evaluation=before, progress=False)
    assert not any("lora" in name.lower() for name, _ in model.named_modules())
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training is False
    assert evaluate(model, before).perplexity == sliced_ppl  # the sliced model, as it came
    _, result = recover(model, [lm_domain("text", windows)], RecoveryConfig(steps=5, **FAST), progress=False)
    assert len(result.losses) == 5 and all(math.isfinite(x) for x in result.losses)  # and it can be tuned again


def test_inputs_are_checked_before_training():
    model, arch, importance = sliced()
    a, b = lm_domain("a", pattern_windows()), lm_domain("b", pattern_windows())
    with pytest.raises(ValueError, match="dense_reference"):
        recover(model, [a, b], RecoveryConfig(steps=2), progress=False)
    with pytest.raises(ValueError, match="unique names"):
        recover(model, [a, a], RecoveryConfig(steps=2), progress=False)
    no_targets = dense_reference(model, [a])
    with pytest.raises(ValueError, match="top_k=32"):
        recover(model, [a], RecoveryConfig(steps=2, distill_weight=0.3), reference=no_targets, progress=False)
    assert not any("lora" in name.lower() for name, _ in model.named_modules())


@pytest.mark.parametrize(("settings", "message"), [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"rank": 2.5}, "rank must be a positive integer"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"distill_weight": 1.5}, r"distill_weight \(the KL share of the loss\) must be in \[0, 1\]"),
    ({"domain_eta": -1.0}, "domain_eta must be >= 0"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be True, False or None"),
    ({"eval_every": 0}, "eval_every must be a positive integer or None"),
])
def test_config_errors_say_what_to_change(settings, message):
    with pytest.raises(RecoveryConfigError, match=message):
        RecoveryConfig(**settings)


def test_config_round_trips_through_a_dict():
    config = RecoveryConfig(steps=7, rank=4, distill_weight=0.25)
    assert RecoveryConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(RecoveryConfigError, match="unknown recovery settings"):
        RecoveryConfig.from_dict({"step": 3})
