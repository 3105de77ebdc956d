import dataclasses
import json

import numpy as np
import pytest

from predictor.base import PredictorError
from predictor.features import FeatureBuilder
from predictor.model import PREDICTOR_VERSION, SIDECAR, BoosterConfig, ObjectivePredictor
from pruning.architecture import Architecture, LayerShape
from pruning.importance import Importance
from tests.predictor.conftest import known_metric, random_architecture


@pytest.fixture(scope="module")
def fitted(table):
    y = known_metric(table) * np.exp(np.random.default_rng(3).normal(0, 0.2, len(table)))  # noisy: not monotone
    return ObjectivePredictor(n_members=4, seed=0).fit(table, y)


def grown(arch: Architecture, rng: np.random.Generator) -> Architecture:
    """`arch` with one layer keeping more of something (heads per group, groups or channels)."""
    s, layers = arch.spec, list(arch.layers)
    i = int(rng.integers(len(layers)))
    x = layers[i]
    kind = rng.integers(3)
    if kind == 0 and x.ffn_channels < s.intermediate_size:
        more = int(rng.integers(x.ffn_channels + 1, s.intermediate_size + 1))
        layers[i] = LayerShape(x.kv_heads, x.heads_per_group, more)
    elif kind == 1 and x.kv_heads < s.num_kv_heads:
        layers[i] = LayerShape(x.kv_heads + 1, max(x.heads_per_group, 1), x.ffn_channels)
    elif x.heads_per_group < s.group_size:
        layers[i] = LayerShape(max(x.kv_heads, 1), x.heads_per_group + 1, x.ffn_channels)
    return Architecture(s, tuple(layers))


def test_keeping_more_never_predicts_a_worse_metric(fitted, builder, importance):
    rng = np.random.default_rng(5)
    base = [random_architecture(importance.spec, rng, drop_prob=0.3) for _ in range(300)]
    bigger = [grown(a, rng) for a in base]
    assert sum(a != b for a, b in zip(base, bigger, strict=True)) > 250
    (before, _), (after, _) = fitted.predict(builder.table(base)), fitted.predict(builder.table(bigger))
    assert (after <= before).all()
    assert (after < before).sum() > 50  # the constraint does not just flatten the model


def test_save_load_round_trip_predicts_identically(fitted, table, tmp_path):
    fitted.save(tmp_path / "p")
    loaded = ObjectivePredictor.load(tmp_path / "p")
    for a, b in zip(fitted.predict(table), loaded.predict(table), strict=True):
        assert np.array_equal(a, b)
    meta = json.loads((tmp_path / "p" / SIDECAR).read_text())
    assert meta["columns"] == list(table.columns) and meta["target"] == "log"
    assert meta["members"] == [f"member_{m}.ubj" for m in range(4)]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted([SIDECAR, *meta["members"]])


@pytest.mark.parametrize("key", ["predictor_version", "feature_version"])
def test_incompatible_saved_version_is_refused(fitted, tmp_path, key):
    path = fitted.save(tmp_path / "p") / SIDECAR
    meta = json.loads(path.read_text())
    meta[key] += 1
    path.write_text(json.dumps(meta))
    with pytest.raises(PredictorError, match=f"saved with {key} {meta[key]}, this code reads .*refit"):
        ObjectivePredictor.load(tmp_path / "p")


def test_missing_or_foreign_files_are_refused(fitted, tmp_path):
    with pytest.raises(PredictorError, match="not found; give a directory written by ObjectivePredictor.save"):
        ObjectivePredictor.load(tmp_path / "nothing")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / SIDECAR).write_text('{"format": "something else"}')
    with pytest.raises(PredictorError, match="not an objective predictor sidecar"):
        ObjectivePredictor.load(tmp_path / "x")
    fitted.save(tmp_path / "p")
    (tmp_path / "p" / "member_1.ubj").write_bytes(b"not a model")
    with pytest.raises(PredictorError, match="cannot read member"):
        ObjectivePredictor.load(tmp_path / "p")
    assert PREDICTOR_VERSION == 1


def test_loaded_predictor_refuses_another_base_model(fitted, importance, tmp_path):
    fitted.save(tmp_path / "p")
    spec = dataclasses.replace(importance.spec, base_model="another-model")
    other = FeatureBuilder(Importance(spec, "wanda", importance.heads, importance.channels))
    with pytest.raises(PredictorError, match="base_model: fitted on 'tiny-llama', table has 'another-model'"):
        ObjectivePredictor.load(tmp_path / "p").predict(other.table([Architecture.full(spec)]))


def test_seed_fixes_the_ensemble(table):
    y = known_metric(table)
    small = BoosterConfig(n_estimators=50)
    a = ObjectivePredictor(n_members=3, seed=1, config=small).fit(table, y).predict(table)
    b = ObjectivePredictor(n_members=3, seed=1, config=small).fit(table, y).predict(table)
    c = ObjectivePredictor(n_members=3, seed=2, config=small).fit(table, y).predict(table)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    assert (a[1] > 0).any()  # members disagree somewhere


def test_bad_settings_say_what_to_change():
    with pytest.raises(ValueError, match="n_members must be >= 1"):
        ObjectivePredictor(n_members=0)
    with pytest.raises(ValueError, match="learning_rate and colsample_bynode must lie in"):
        BoosterConfig(learning_rate=0)
