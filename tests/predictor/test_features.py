import dataclasses
import time

import numpy as np
import pytest
from transformers import LlamaConfig

from predictor.features import (
    FEATURE_VERSION,
    SIGNATURE_KEY,
    FeatureBuilder,
    FeatureError,
    direction,
    feature_columns,
)
from pruning.adapter import spec_from_config
from pruning.architecture import Architecture, LayerShape
from pruning.importance import Importance
from tests.conftest import tiny_config
from tests.predictor.conftest import random_architecture


def hand_importance() -> Importance:
    spec = spec_from_config(tiny_config(), "tiny-llama")  # 3 layers, 2 KV groups of 3 heads, 40 channels
    heads = (np.array([[5.0, 1.0, 0.0], [3.0, 3.0, 2.0]]), np.ones((2, 3)), np.zeros((2, 3)))
    channels = (np.arange(40.0), np.ones(40), np.arange(40.0)[::-1].copy())
    return Importance(spec, "wanda", heads, channels)


def test_columns_are_named_and_ordered():
    assert feature_columns(2) == [
        "params_frac", "attn_params_frac", "mlp_params_frac", "mass_total", "mass_mean",
        "attn_mass_mean", "ffn_mass_mean", "attn_mass_min", "ffn_mass_min", "mass_early", "mass_late",
        "attn_dropped_count", "ffn_dropped_count",
        "attn_frac_0", "attn_frac_1", "ffn_frac_0", "ffn_frac_1", "attn_mass_0", "attn_mass_1",
        "ffn_mass_0", "ffn_mass_1", "attn_dropped_0", "attn_dropped_1", "ffn_dropped_0", "ffn_dropped_1",
        "block_params_0", "block_params_1",
    ]
    assert [direction(c) for c in ("attn_mass_0", "params_frac", "ffn_dropped_1", "attn_dropped_count")] == [
        -1, -1, 1, 1]


def test_table_has_the_builder_columns_and_signature(builder, table, importance):
    assert list(table.columns) == feature_columns(4) == builder.columns
    assert table.shape == (48, 13 + 7 * 4)
    sig = table.attrs[SIGNATURE_KEY]
    assert sig["feature_version"] == FEATURE_VERSION
    assert (sig["base_model"], sig["importance_method"]) == ("tiny-llama", "wanda")
    assert table.iloc[:3].attrs[SIGNATURE_KEY] == sig  # survives row selection


def test_full_architecture_keeps_everything(builder, importance):
    row = builder.table([Architecture.full(importance.spec)]).iloc[0]
    for col, value in row.items():
        assert value == (0.0 if "dropped" in col else 1.0), col


def test_hand_computed_masses():
    imp = hand_importance()
    arch = Architecture(imp.spec, (LayerShape(1, 2, 10), LayerShape(0, 0, 40), LayerShape(2, 1, 0)))
    row = FeatureBuilder(imp).table([arch]).iloc[0]
    # layer 0: both groups' top-2 heads sum to 6 -> 6/14; top-10 channels 30..39 -> 345/780
    assert row["attn_mass_0"] == 6 / 14 and row["ffn_mass_0"] == 345 / 780
    assert row["attn_frac_0"] == 2 / 6 and row["ffn_frac_0"] == 10 / 40
    # layer 1: attention dropped; layer 2: all-zero head scores count units equally -> 2 of 6 heads
    assert (row["attn_mass_1"], row["attn_dropped_1"], row["ffn_mass_1"]) == (0.0, 1.0, 1.0)
    assert (row["attn_mass_2"], row["ffn_mass_2"], row["ffn_dropped_2"]) == (2 / 6, 0.0, 1.0)
    assert (row["attn_dropped_count"], row["ffn_dropped_count"]) == (1.0, 1.0)
    assert row["mass_mean"] == pytest.approx((6 / 14 + 0 + 2 / 6 + 345 / 780 + 1 + 0) / 6, abs=1e-15)
    # pooled raw scores: kept 6 + 0 + 2 (ones) + 345 + 40 + 0 of 14 + 6 + 6 + 780 + 40 + 780
    assert row["mass_total"] == pytest.approx(393 / 1626, abs=1e-15)
    assert row["params_frac"] * Architecture.full(imp.spec).params() == pytest.approx(arch.params(), abs=1e-6)


def test_masses_follow_the_units_importance_keeps(builder, archs, table, importance):
    full = Architecture.full(importance.spec).params()
    for arch, (_, row) in zip(archs, table.iterrows(), strict=True):
        assert row["params_frac"] * full == pytest.approx(arch.params(), abs=1e-6)
        for i, shape in enumerate(arch.layers):
            heads = importance.heads[i].ravel()[importance.kept_heads(i, shape).ravel()].sum()
            channels = importance.channels[i][importance.kept_channels(i, shape)].sum()
            assert row[f"attn_mass_{i}"] == pytest.approx(heads / importance.heads[i].sum(), abs=1e-12)
            assert row[f"ffn_mass_{i}"] == pytest.approx(channels / importance.channels[i].sum(), abs=1e-12)


def test_architecture_of_another_model_is_refused(builder):
    other = dataclasses.replace(builder.spec, base_model="another-model")
    with pytest.raises(FeatureError, match="architecture is for another-model"):
        builder.table([Architecture.full(other)])


def test_features_of_5000_architectures_of_a_32_layer_model_are_fast():
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8)
    spec = spec_from_config(config, "llama-3-8b-shape")
    rng = np.random.default_rng(0)
    imp = Importance(spec, "wanda", tuple(rng.random((8, 4)) for _ in range(32)),
                     tuple(rng.random(14336) for _ in range(32)))
    builder = FeatureBuilder(imp)
    pool = [random_architecture(spec, rng) for _ in range(100)] * 50
    start = time.process_time()  # this process's CPU seconds: other jobs on a shared machine do not count
    table = builder.table(pool)
    assert time.process_time() - start < 2.0
    assert table.shape == (5000, 13 + 7 * 32)
