"""The predictor-guided sampler: measure a few candidates, learn, propose the most promising next.

With a sensitivity table (`pruning.sensitivity`, the default in `search.run`) the search starts
where the rival ends. Its first trial is the sensitivity knapsack, so it never returns anything
worse on the search windows. With a second, local table measured around that knapsack (each
sublayer moved while the others stay pruned), its second trial is the knapsack of the local
table: the additive estimate re-linearised where the search works, which is where the dense
table's goes wrong (errors are not additive far from the dense model). The predictor learns the
residual of the additive estimate (`predictor.base`), the local table's when there is one. Its
candidates include knapsacks re-solved on transformed costs: tilted over depth and between
attention and FFN (`_tilted`), corrected per sublayer by the measured pairs (`_corrected_costs`),
and the local knapsack with perturbed costs (`_local_knapsacks`).

Each `ask` (Optuna's relative sampling) does:
    startup (fewer than `n_startup` finished trials): with a table, the knapsack, the local knapsack
            (with a local table) and then tilted knapsacks; without one, uniform, importance-threshold,
            then random allocations whose attention/FFN splits are stratified over [0, 1], so the
            startup pairs span the main trade-off whatever the seed
    guided: fit the objective predictor on the finished trials -> generate a pool of candidates
            (mutations and swaps of the best, crossovers of good pairs, fresh random ones, and with a
            table the tilted, corrected and local knapsacks) -> score each by the lower confidence bound
            mean - exploration * spread  (the metric is minimised) -> propose the best one that no
            finished or running trial already holds. Without a table, every `explore_every`-th guided
            trial chooses among fresh random candidates only: the ensemble's spread is small far from
            the data, so without these trials the search can settle on a local optimum.
The prediction made for the proposed candidate is written to the trial before it is measured, so
prediction quality over the run can be judged afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial
from sklearn.linear_model import RidgeCV

from predictor.features import FeatureBuilder
from predictor.model import ObjectivePredictor
from pruning.architecture import Architecture
from pruning.importance import Importance
from pruning.sensitivity import SensitivityTable
from search import knapsack
from search.space import SearchSpace
from search.trials import ARCH_ATTR, measured, trial_architecture, write_proposal  # noqa: F401 (ARCH_ATTR re-exported)

logger = logging.getLogger(__name__)

class PredictorSampler(BaseSampler):
    def __init__(
        self,
        space: SearchSpace,
        importance: Importance,
        sensitivity: SensitivityTable | None = None,
        local: SensitivityTable | None = None,
        n_startup: int = 8,
        pool_size: int = 1000,
        exploration: float = 1.0,
        n_members: int = 8,
        explore_every: int = 4,
        seed: int = 0,
    ):
        if n_startup < 5:
            raise ValueError(f"n_startup must be at least 5 so the predictor has pairs to learn from, got {n_startup}")
        self.space, self.importance = space, importance
        self.n_startup, self.pool_size, self.exploration = n_startup, pool_size, exploration
        self.n_members, self.explore_every, self.seed = n_members, explore_every, seed
        self.features = FeatureBuilder(importance, local or sensitivity)  # the estimate nearest the candidates
        if local is not None and sensitivity is None:
            raise ValueError("a local sensitivity table refines the dense one: pass `sensitivity` too")
        self.costs = knapsack.level_costs(space, sensitivity) if sensitivity is not None else None
        self.local_costs = knapsack.level_costs(space, local) if local is not None else None
        self._fallback = RandomSampler(seed=seed)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.space.distributions()

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, int]:
        if not search_space:
            return {}
        rng = np.random.default_rng([self.seed, trial.number])
        taken = {self._key(a) for a in self._existing(study, trial)}
        archs, values = measured(study)
        if len(archs) < self.n_startup:
            arch, phase, note = self._startup(len(archs), taken, rng), "startup", {}
        else:
            # with a table, the tilted and perturbed knapsacks give the pool its spread: no blind exploration
            due = (len(archs) - self.n_startup) % self.explore_every == self.explore_every - 1
            explore = due and self.costs is None
            arch, note = self._guided(archs, values, taken, rng, explore)
            phase = "explore" if explore else "guided"
        write_proposal(study, trial, phase, note)
        return self.space.to_params(arch)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    # ---- phases --------------------------------------------------------------------------------
    def _startup(self, n_measured: int, taken: set, rng: np.random.Generator) -> Architecture:
        if self.costs is not None:  # the knapsack, the local one, tilted knapsacks: the axes, the rest in seeded order
            tilted = self._tilted
            order = np.random.default_rng(self.seed).permutation(np.arange(5, len(tilted)))
            first = [tilted[0], *self._local_knapsacks[:1], *tilted[1:5]]
            return self._fresh(first + [tilted[i] for i in order], taken, rng)
        fixed = [self.space.uniform(), self.space.threshold(self.importance)]
        for arch in fixed[n_measured:]:
            if self._key(arch) not in taken:
                return arch
        k = n_measured - len(fixed)
        # the k-th random startup draws its split from the k-th of n equal strata, in a seeded order
        n = max(self.n_startup - len(fixed), 1)
        stratum = np.random.default_rng(self.seed).permutation(n)[k % n]
        return self._fresh([self.space.random(rng, split=(stratum + rng.uniform()) / n) for _ in range(20)], taken, rng)

    def _perturbed_knapsack(
        self, rng: np.random.Generator, sigma: float, costs: tuple[np.ndarray, np.ndarray]
    ) -> Architecture:
        """The knapsack on `costs` with each sublayer's scaled by its own log-normal factor."""
        attn, ffn = costs
        scale = np.exp(rng.normal(0, sigma, (2, len(attn), 1)))  # one factor per sublayer keeps its curve's shape
        return knapsack.solve(self.space, attn * scale[0], ffn * scale[1])

    @cached_property
    def _tilted(self) -> list[Architecture]:
        """Knapsacks whose costs lean with depth and between attention and FFN, the two directions in which
        errors compound most (early layers feed all later ones; attention and FFN interact):

            cost'[i] = cost[i] * exp(depth * (i / (L-1) - 1/2) +/- split / 2)      (+ attention, - FFN)

        for depth, split in a 5 x 5 grid; first the knapsack itself (0, 0), then the four axes' ends."""
        attn, ffn = self.costs
        position = np.linspace(-0.5, 0.5, len(attn))[:, None]  # (L, 1)
        grid = [(0, 0), (2, 0), (-2, 0), (0, 1.5), (0, -1.5)]
        grid += [(d, t) for d in (-2, -1, 0, 1, 2) for t in (-1.5, -0.75, 0, 0.75, 1.5) if (d, t) not in grid]
        return [knapsack.solve(self.space, attn * np.exp(d * position + t / 2), ffn * np.exp(d * position - t / 2))
                for d, t in grid]

    @cached_property
    def _local_knapsacks(self) -> list[Architecture]:
        """The local table's knapsack and 3 perturbations of it (sigma 0.1, 0.2, 0.4); none without a local table."""
        if self.local_costs is None:
            return []
        rng = np.random.default_rng([self.seed, 1])
        return [knapsack.solve(self.space, *self.local_costs),
                *(self._perturbed_knapsack(rng, sigma, self.local_costs) for sigma in (0.1, 0.2, 0.4))]

    def _corrected_costs(self, archs: list[Architecture], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The table's costs with one factor per sublayer fitted to the measured pairs:

            log(metric) ~ a + sum_s w_s cost_s(arch),   w = b (1 + delta),  delta by ridge toward 0

        where a + b * sum_s cost_s is the least-squares line. A sublayer whose cost the table under-estimates
        in the pruned context gets w_s > b, and the knapsack re-solved on w * cost spares it."""
        attn, ffn = self.costs
        n_layers, rows = len(attn), np.arange(len(attn))
        per_sublayer = np.array([np.concatenate([attn[rows, lv], ffn[rows, f]])
                                 for lv, f in (self.space.indices(a) for a in archs)])  # (n, 2L)
        y = np.log(values)
        total = per_sublayer.sum(1)
        b = max(np.polyfit(total, y, 1)[0], 1e-3) if np.ptp(total) > 0 else 1.0
        residual = y - y.mean() - b * (total - total.mean())
        ridge = RidgeCV(alphas=np.logspace(-4, 1, 11)).fit(per_sublayer * b, residual)
        w = b * np.clip(1 + ridge.coef_, 0.1, None)  # (2L,)
        return attn * w[:n_layers, None], ffn * w[n_layers:, None]

    def _guided(
        self, archs: list[Architecture], values: np.ndarray, taken: set, rng: np.random.Generator, explore: bool
    ) -> tuple[Architecture, dict]:
        candidates = (
            [self.space.random(rng) for _ in range(self.pool_size // 2)] if explore else self._pool(archs, values, rng)
        )
        pool = [a for a in candidates if self._key(a) not in taken]
        if not pool:
            return self._fresh([], taken, rng), {}
        mean, spread = self.predict(archs, values, pool)
        best = int(np.argmin(mean - self.exploration * spread))
        return pool[best], {"predicted": float(mean[best]), "predicted_spread": float(spread[best])}

    def predict(
        self, archs: list[Architecture], values: np.ndarray, pool: list[Architecture]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mean (P,), spread (P,)) of the metric for each pool candidate, learned from the measured pairs."""
        predictor = ObjectivePredictor(n_members=self.n_members, seed=self.seed).fit(self.features.table(archs), values)
        return predictor.predict(self.features.table(pool))

    def _pool(self, archs: Sequence[Architecture], values: np.ndarray, rng: np.random.Generator) -> list[Architecture]:
        """Mutations of the top quarter (40%; with a table half of them are swaps), crossovers among it
        (20%), fresh random candidates (40%, so the predictor can send the search to regions no measured
        trial is near) and, with a table, the tilted knapsacks, the knapsack re-solved on costs corrected by the
        measured pairs and 3 perturbations of it, and the local knapsacks (HiGHS takes ~0.6 s for each solve of
        SmolLM2's 30 layers)."""
        elite = [archs[i] for i in np.argsort(values)[: max(2, len(archs) // 4)]]
        n = self.pool_size
        pool = []
        for k in range(2 * n // 5):
            parent = elite[rng.integers(len(elite))]
            pool.append(self.space.swap(parent, rng) if self.costs is not None and k % 2 else
                        self.space.mutate(parent, rng))
        for _ in range(n // 5):
            i, j = rng.choice(len(elite), size=2, replace=False)
            pool.append(self.space.crossover(elite[i], elite[j], rng))
        pool += [self.space.random(rng) for _ in range(n - len(pool))]
        if self.costs is not None:
            corrected = self._corrected_costs(list(archs), values)
            pool += [knapsack.solve(self.space, *corrected), *self._tilted]
            pool += [self._perturbed_knapsack(rng, sigma, corrected) for sigma in (0.1, 0.2, 0.4)]
            pool += self._local_knapsacks
        unique = {self._key(a): a for a in pool}
        return list(unique.values())

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _key(self, arch: Architecture) -> tuple:
        return tuple(self.space.to_params(arch).values())

    def _existing(self, study: optuna.Study, current: FrozenTrial) -> list[Architecture]:
        """Architectures of finished and running trials (running ones by their parameters)."""
        out = []
        for t in study.get_trials(deepcopy=False):
            if t.number == current.number:
                continue
            arch = trial_architecture(t)
            if arch is None and len(t.params) == len(self.space.distributions()):
                arch = self.space.from_params(t.params)
            if arch is not None:
                out.append(arch)
        return out

    def _fresh(self, candidates: list[Architecture], taken: set, rng: np.random.Generator) -> Architecture:
        """The first candidate no trial holds, else the first such of 200 random ones."""
        more = [self.space.random(rng) for _ in range(200)]
        for arch in candidates + more:
            if self._key(arch) not in taken:
                return arch
        logger.warning("every generated candidate was already measured; repeating one")
        return more[0]


class AdditiveSampler(PredictorSampler):
    """The knapsack alone, as a search: the same startup and pool, ranked by the sensitivity table's
    additive estimate (the local table's when given) instead of a learned predictor (the rival's best
    guesses, in order)."""

    def __init__(self, space: SearchSpace, importance: Importance, sensitivity: SensitivityTable,
                 local: SensitivityTable | None = None, **kwargs):
        super().__init__(space, importance, sensitivity, local, exploration=0.0, **kwargs)
        self.sensitivity = local or sensitivity  # the local table estimates best near the knapsack

    def predict(self, archs, values, pool):
        return self.sensitivity.additive(pool), np.zeros(len(pool))
