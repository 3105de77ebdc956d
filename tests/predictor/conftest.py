"""A tiny Llama's real importance scores, random architectures of it and a synthetic metric with a known ranking."""

from __future__ import annotations

import numpy as np
import pytest

from predictor.features import FeatureBuilder
from pruning.architecture import Architecture, LayerShape, ModelSpec
from pruning.importance import Importance, compute_importance
from tests.conftest import tiny_model


def random_architecture(spec: ModelSpec, rng: np.random.Generator, drop_prob: float = 0.1) -> Architecture:
    layers = []
    for _ in range(spec.num_layers):
        kv = 0 if rng.random() < drop_prob else int(rng.integers(1, spec.num_kv_heads + 1))
        h = int(rng.integers(1, spec.group_size + 1)) if kv else 0
        ffn = 0 if rng.random() < drop_prob else int(rng.integers(1, spec.intermediate_size + 1))
        layers.append(LayerShape(kv, h, ffn))
    return Architecture(spec, tuple(layers))


def known_metric(table) -> np.ndarray:
    """A perplexity-like metric that strictly falls as the mean mass kept rises: exp(1 + 3 * (1 - mass_mean))."""
    return np.exp(1.0 + 3.0 * (1.0 - table["mass_mean"].to_numpy()))


@pytest.fixture(scope="session")
def importance(windows_session) -> Importance:
    return compute_importance(tiny_model("llama", num_hidden_layers=4), windows_session)


@pytest.fixture(scope="session")
def windows_session():
    import torch

    return torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def builder(importance) -> FeatureBuilder:
    return FeatureBuilder(importance)


@pytest.fixture(scope="session")
def archs(importance) -> list[Architecture]:
    rng = np.random.default_rng(0)
    return [random_architecture(importance.spec, rng) for _ in range(48)]


@pytest.fixture(scope="session")
def table(builder, archs):
    return builder.table(archs)
