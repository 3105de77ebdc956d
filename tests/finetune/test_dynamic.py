"""Sheared-LLaMA dynamic batch loading: exact update, movement toward the larger excess loss, sampling."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.dynamic import SMOOTHING, DomainSampler, update_weights


def test_update_matches_the_formula():
    w = np.array([0.5, 0.3, 0.2])
    got = update_weights(w, losses=np.array([3.0, 2.5, 1.0]), reference=np.array([2.0, 2.0, 2.0]), eta=0.5)
    raw = w * np.exp(0.5 * np.array([1.0, 0.5, 0.0]))
    expected = (1 - SMOOTHING) * raw / raw.sum() + SMOOTHING / 3
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert got.sum() == pytest.approx(1.0, abs=1e-15)


def test_weights_move_toward_the_domain_with_the_larger_excess_loss():
    w = np.array([0.5, 0.5])
    after = update_weights(w, losses=np.array([2.4, 3.5]), reference=np.array([2.0, 2.5]), eta=1.0)
    assert after[1] > 0.5 > after[0]
    below = update_weights(w, losses=np.array([1.0, 3.0]), reference=np.array([2.0, 3.0]), eta=1.0)
    np.testing.assert_allclose(below, [0.5, 0.5], rtol=0, atol=1e-15)


def test_sampler_updates_from_observed_losses_every_n_steps():
    sampler = DomainSampler([4, 6], reference=[2.0, 2.0], eta=1.0, update_every=2, seed=0)
    sampler.observe(0, nll_sum=20.0, tokens=10)  # mean 2.0: no excess
    sampler.observe(1, nll_sum=30.0, tokens=10)  # mean 3.0: excess 1.0
    sampler.step(1)
    assert sampler.history == [(0.5, 0.5)]
    sampler.step(2)
    w = np.array([1.0, np.e]) / (1 + np.e) * (1 - SMOOTHING) + SMOOTHING / 2
    np.testing.assert_allclose(sampler.history[-1], w, rtol=0, atol=1e-15)
    sampler.step(4)  # nothing observed since: the last estimates apply again
    assert sampler.history[-1][1] > w[1]


def test_each_pass_visits_every_row_once_and_sampling_is_seeded():
    sampler = DomainSampler([5], reference=[0.0], eta=1.0, update_every=1, seed=3)
    rows = [r for _ in range(3) for _, r in sampler.sample(5)]
    assert [sorted(rows[i : i + 5]) for i in (0, 5, 10)] == [[0, 1, 2, 3, 4]] * 3
    again = DomainSampler([5], reference=[0.0], eta=1.0, update_every=1, seed=3)
    assert [r for _ in range(3) for _, r in again.sample(5)] == rows
