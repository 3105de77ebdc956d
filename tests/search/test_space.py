import numpy as np
import pytest
from transformers import LlamaConfig

from pruning.adapter import spec_from_config
from pruning.architecture import Architecture
from pruning.importance import compute_importance
from search.budget import BudgetError, parse_budget
from search.space import InfeasibleBudgetError, SearchSpace
from tests.conftest import tiny_config, tiny_model

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5B", 5_000_000_000), ("350M", 350_000_000), ("2.5e9", 2_500_000_000), ("70%", 4_716_890_931),
     ("0.7", 4_716_890_931)],
)
def test_parse_budget(text, expected):
    assert parse_budget(text, 6_738_415_616) == pytest.approx(expected, abs=1)


@pytest.mark.parametrize(
    ("text", "message"), [("5X", "cannot read budget"), ("7B", "not below"), ("150%", "not below")]
)
def test_bad_budgets_say_what_to_change(text, message):
    with pytest.raises(BudgetError, match=message):
        parse_budget(text, 6_738_415_616)


def test_projection_hits_5b_for_llama2_7b_without_weights():
    space = SearchSpace(spec_from_config(LLAMA2_7B, "llama-2-7b"), budget=5_000_000_000, ffn_step=128)
    rng = np.random.default_rng(0)
    for arch in [space.uniform(), *(space.random(rng) for _ in range(20))]:
        assert space.fits(arch), arch.params()
        assert all(x.ffn_channels % 128 == 0 or x.ffn_channels == 11008 for x in arch.layers)


def test_uniform_is_the_same_in_every_layer_up_to_the_fill():
    space = SearchSpace(spec_from_config(LLAMA2_7B, "llama-2-7b"), budget=5_000_000_000, ffn_step=128)
    arch = space.uniform()
    assert len({x.query_heads for x in arch.layers}) <= 2
    assert max(x.ffn_channels for x in arch.layers) - min(x.ffn_channels for x in arch.layers) <= 128



def test_uniform_with_whole_end_layers_cuts_only_the_middle_alike():
    space = SearchSpace(spec_from_config(LLAMA2_7B, "llama-2-7b"), budget=5_000_000_000, ffn_step=128)
    arch = space.uniform(dense_first=4, dense_last=2)  # LLM-Pruner's LLaMA-7B recipe
    full = Architecture.full(space.spec).layers[0]
    assert arch.layers[:4] == arch.layers[-2:] + arch.layers[-2:] == (full,) * 4
    middle = arch.layers[4:-2]
    assert len({x.query_heads for x in middle}) <= 2 and max(x.query_heads for x in middle) < full.query_heads
    assert max(x.ffn_channels for x in middle) - min(x.ffn_channels for x in middle) <= 128
    assert space.budget - 2 * space.spec.mlp_params(128) <= arch.params() <= space.budget
    with pytest.raises(ValueError, match="leave none"):
        space.uniform(dense_first=30, dense_last=2)

def test_params_round_trip_through_optuna_values():
    spec = spec_from_config(tiny_config(), "tiny")
    space = SearchSpace(spec, budget=int(Architecture.full(spec).params() * 0.8), ffn_step=8)
    rng = np.random.default_rng(1)
    for _ in range(10):
        arch = space.random(rng)
        params = space.to_params(arch)
        assert space.from_params(params) == arch
        for name, value in params.items():
            assert space.distributions()[name]._contains(value)


def test_generators_meet_the_budget(windows):
    model = tiny_model()
    spec = spec_from_config(model.config, "tiny")
    # one FFN channel (3 * 48 params) is finer than the 0.5% tolerance (~190 params) of this tiny model
    space = SearchSpace(spec, budget=int(Architecture.full(spec).params() * 0.85), ffn_step=1)
    importance = compute_importance(model, windows)
    rng = np.random.default_rng(2)
    a, b = space.random(rng), space.threshold(importance)
    for arch in (space.uniform(), a, b, space.mutate(a, rng), space.crossover(a, b, rng)):
        assert space.lower_bound() <= arch.params() <= space.budget


def test_budget_below_smallest_architecture_is_refused():
    spec = spec_from_config(tiny_config(), "tiny")
    with pytest.raises(InfeasibleBudgetError, match="raise the budget or allow dropping sublayers"):
        SearchSpace(spec, budget=spec.shared_params() + 10, allow_drop=False)
