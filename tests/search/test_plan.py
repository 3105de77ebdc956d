"""The memory plan on configs shaped as the hub ships them, built locally (no download, no weights)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig

from search import run
from search.config import RunConfig
from search.objectives import KL
from search.plan import PlanError, check_fits, make_plan

GIB = 2**30
H100 = 80 * 10**9  # bytes
HUB = {  # as in the hub's config.json files
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                        rope_theta=500000.0),
}


@pytest.fixture(scope="module")
def hub_configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-configs")
    for name, fields in HUB.items():
        LlamaConfig(**fields).save_pretrained(root / name)
    return root


def plan(root, name, device="cuda", capacity=H100, **settings):
    config = RunConfig(model=str(root / name), device=device, **settings)
    return config, make_plan(config, torch.device(device), capacity, rate=4e14, host_capacity=512 * GIB)


def stage(p, name):
    return next(s for s in p.stages if s.name == name)


def test_llama_2_7b_on_one_h100(hub_configs):
    config, p = plan(hub_configs, "llama-2-7b", budget="5B")
    assert (p.params, p.budget_params, p.dtype) == (6_738_415_616, 5_000_000_000, "bfloat16")
    assert p.weight_bytes == 2 * 6_738_415_616
    # per layer: 33 attention levels (0..32 heads, MHA) x 1377 FFN widths (0..11008 step 8)
    assert p.space_dims == 64 and p.space_log10 == pytest.approx(32 * math.log10(33 * 1377))
    # candidate evaluation: W + act + chunk (flash attention on CUDA: no score matrix)
    act = 8 * 256 * (2 * 4096 + 4096 + 2 * 4096 + 3 * 11008) * 2
    chunk = min(8 * 255, 4096) * 32000 * (2 + 4)
    assert stage(p, "candidate evaluation").device_bytes == p.weight_bytes + act + chunk
    assert stage(p, "load").host_bytes == p.weight_bytes
    assert p.trial_tokens == 32 * 256 and p.trial_seconds == pytest.approx(p.trial_flops / 4e14)
    # tables on S windows (the default, 2), 8 points: 9 attention levels (32 heads spread to 8, and 0) and 9 FFN
    # widths per layer; dense: 32 layers x 16 moves + the dense pass; local (reach 1): at most 32 layers x 2
    # sublayers x (1 size each side + one of the base's parameter count) + its base's pass
    S = config.sensitivity_windows
    assert p.table_windows == (32 * 16 + 1) * S + (32 * 2 * 3 + 1) * S
    assert f"sensitivity tables: at most {p.table_windows:,} windows (= {p.table_windows // 32} trials)" in p.to_text()
    assert "objective" not in p.to_text()  # perplexity: the trial line is the objective's
    _, kl = plan(hub_configs, "llama-2-7b", budget="5B", objective="kl")
    assert kl.objective_cost == KL.relative_cost > 1
    assert f"objective kl: about {KL.relative_cost:g}x a perplexity trial" in kl.to_text()
    assert p.problem() is None
    check_fits(p, config)
    assert "verdict: fits" in p.to_text()


def test_llama_3_70b_does_not_fit_one_h100_and_says_why(hub_configs):
    config, p = plan(hub_configs, "llama-3-70b", budget="50B")
    assert (p.params, p.weight_bytes) == (70_553_706_496, 2 * 70_553_706_496)
    assert p.problem().name == "load"
    with pytest.raises(PlanError, match=r"the weights alone are 131\.42 GiB in bfloat16: use a device with more"):
        check_fits(p, config)


def test_an_oversized_batch_is_refused_naming_a_batch_size_that_fits(hub_configs):
    config, p = plan(hub_configs, "llama-2-7b", capacity=24 * GIB, budget="5B", batch_size=64, seq_len=2048)
    assert p.problem().name == "importance (wanda, fluctuation)"  # 64 x 2048 x 32000 logits in bf16: 7.8 GiB
    with pytest.raises(PlanError, match=r"give --batch-size \d+ \(or less\)") as err:
        check_fits(p, config)
    fitting = int(str(err.value).split("--batch-size ")[1].split()[0])
    _, smaller = plan(hub_configs, "llama-2-7b", capacity=24 * GIB, budget="5B", batch_size=fitting, seq_len=2048)
    _, one_more = plan(hub_configs, "llama-2-7b", capacity=24 * GIB, budget="5B", batch_size=fitting + 1,
                       seq_len=2048)
    assert smaller.problem() is None and one_more.problem() is not None


def test_stages_outside_the_run_are_shown_not_judged(hub_configs):
    _, p = plan(hub_configs, "llama-2-7b", budget="5B", export=False)
    assert p.verdict_stages == ("load", "importance (wanda, fluctuation)", "candidate evaluation")
    assert "LoRA + distillation" in p.to_text() and "(not in this run)" in p.to_text()


def test_cpu_plans_count_float32_and_attention_scores(hub_configs):
    _, p = plan(hub_configs, "llama-2-7b", device="cpu", capacity=512 * GIB, budget="5B")
    assert p.dtype == "float32" and p.weight_bytes == 4 * 6_738_415_616
    act = 8 * 256 * (2 * 4096 + 4096 + 2 * 4096 + 3 * 11008) * 4
    attn = 8 * 32 * 256 * 256 * 4
    chunk = min(8 * 255, 4096) * 32000 * (4 + 4)
    assert stage(p, "candidate evaluation").device_bytes == p.weight_bytes + act + attn + chunk


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert run.main(["--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("memory plan: ") and "parameters 8.13M -> budget 4.88M (60.0%)" in text
    assert "verdict: fits" in text
    assert not out.exists()


def test_a_run_that_cannot_fit_exits_2_before_reading_weights(hub_configs, tmp_path, capsys):
    out = tmp_path / "run"
    # float32 on the CPU: 282 GB of weights (no tokenizer and no weights in the directory: only the config is read)
    assert run.main(["--model", str(hub_configs / "llama-3-70b"), "--budget", "50B", "--device", "cpu",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "memory plan:" in err and "the weights alone are 262.83 GiB in float32" in err
    assert not out.exists()
