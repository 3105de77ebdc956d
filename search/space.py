"""The per-layer search space, projection onto the budget, and candidate generators.

A candidate is first described by two fraction vectors over depth, (L,) each:
the share of a full layer's attention cost and of its FFN channels it wants to
keep (0 = drop the sublayer). `SearchSpace.project` turns any such description
into a concrete `Architecture` whose parameter count lies in
[budget * (1 - tolerance), budget]: it scales every fraction by one factor t
(found by bisection; params(t) is monotone), rounds to the discrete choices, and
spends what is left of the budget greedily on the layers that wanted the most.

Discrete choices per layer, exposed to Optuna as integer parameters:
    attn_XX: attention level 0..A, level k = k-th cheapest (kv_heads, heads_per_group), 0 = dropped
    ffn_XX:  kept FFN channels, a multiple of `ffn_step` (the full width always allowed), 0 = dropped
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from optuna.distributions import IntDistribution

from pruning.architecture import Architecture, LayerShape, ModelSpec
from pruning.importance import Importance


class SpaceError(ValueError):
    pass


class InfeasibleBudgetError(ValueError):
    pass


@dataclass(frozen=True)
class SearchSpace:
    spec: ModelSpec
    budget: int
    ffn_step: int = 8
    allow_drop: bool = True
    tolerance: float = 0.005
    levels: tuple[tuple[int, int], ...] = field(init=False)  # (kv_heads, heads_per_group), cheapest first
    level_cost: np.ndarray = field(init=False, repr=False, compare=False)  # (A+1,) attention params per level

    def __post_init__(self) -> None:
        s = self.spec
        if self.ffn_step < 1 or self.ffn_step > s.intermediate_size:
            raise SpaceError(f"--ffn-step must be in 1..{s.intermediate_size} (the model's FFN width), "
                             f"got {self.ffn_step}; the default is 8")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        pairs = [(kv, h) for kv in range(1, s.num_kv_heads + 1) for h in range(1, s.group_size + 1)]
        pairs.sort(key=lambda p: (s.attention_params(*p), p))
        levels = ((0, 0), *pairs)
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "level_cost", np.array([s.attention_params(*p) for p in levels], dtype=np.int64))
        if self.budget < self.min_params():
            raise InfeasibleBudgetError(
                f"budget {self.budget:,} is below the smallest architecture this space holds "
                f"({self.min_params():,} parameters); raise the budget"
                + ("" if self.allow_drop else " or allow dropping sublayers")
            )
        if self.budget >= Architecture.full(s).params():
            raise InfeasibleBudgetError(f"budget {self.budget:,} is not below the model's size; lower it")

    # ---- discrete choices --------------------------------------------------------------
    @property
    def min_level(self) -> int:
        return 0 if self.allow_drop else 1

    @property
    def min_ffn(self) -> int:
        return 0 if self.allow_drop else self.ffn_step

    def min_params(self) -> int:
        per_layer = self.level_cost[self.min_level] + self.spec.mlp_params(self.min_ffn)
        return self.spec.shared_params() + int(per_layer) * self.spec.num_layers

    def lower_bound(self) -> int:
        return int(self.budget * (1 - self.tolerance))

    def fits(self, arch: Architecture) -> bool:
        return self.lower_bound() <= arch.params() <= self.budget

    def ffn_choices(self) -> np.ndarray:
        """Every FFN width a layer may keep, ascending: 0 (dropped) or multiples of ffn_step, and the full width."""
        width = self.spec.intermediate_size
        return np.array(sorted({0, *range(self.ffn_step, width, self.ffn_step), width}), dtype=np.int64)

    def distributions(self) -> dict[str, IntDistribution]:
        top = -(-self.spec.intermediate_size // self.ffn_step) * self.ffn_step  # ceil to the step; maps to full
        out = {}
        for i in range(self.spec.num_layers):
            out[f"attn_{i:02d}"] = IntDistribution(self.min_level, len(self.levels) - 1)
            out[f"ffn_{i:02d}"] = IntDistribution(self.min_ffn, top, step=self.ffn_step)
        return out

    def to_params(self, arch: Architecture) -> dict[str, int]:
        """Optuna parameters of an architecture of this space (full FFN width shows as the top value)."""
        top = self.distributions()["ffn_00"].high
        out = {}
        for i, x in enumerate(arch.layers):
            out[f"attn_{i:02d}"] = self.levels.index((x.kv_heads, x.heads_per_group))
            out[f"ffn_{i:02d}"] = top if x.ffn_channels == self.spec.intermediate_size else x.ffn_channels
        return out

    def from_params(self, params: dict[str, int]) -> Architecture:
        """The architecture the parameters name, unprojected."""
        layers = []
        for i in range(self.spec.num_layers):
            kv, h = self.levels[params[f"attn_{i:02d}"]]
            layers.append(LayerShape(kv, h, min(int(params[f"ffn_{i:02d}"]), self.spec.intermediate_size)))
        return Architecture(self.spec, tuple(layers))

    # ---- fractions <-> architectures ---------------------------------------------------------
    def fractions(self, arch: Architecture) -> tuple[np.ndarray, np.ndarray]:
        """(attention cost share, FFN channel share) per layer, each (L,)."""
        attn = np.array([self.spec.attention_params(x.kv_heads, x.heads_per_group) for x in arch.layers], float)
        ffn = np.array([x.ffn_channels for x in arch.layers], float)
        return attn / self.level_cost[-1], ffn / self.spec.intermediate_size

    def _discretise(self, attn_frac: np.ndarray, ffn_frac: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Levels (L,) and FFN channels (L,) for fractions scaled by t; kept sublayers never go below the minimum."""
        full_attn, width = self.level_cost[-1], self.spec.intermediate_size
        levels = np.searchsorted(self.level_cost, attn_frac * t * full_attn, side="right") - 1
        levels = np.where(attn_frac > 0, np.maximum(levels, 1), self.min_level)
        ffn = np.floor(np.minimum(ffn_frac * t, 1.0) * width / self.ffn_step) * self.ffn_step
        ffn = np.where(ffn_frac * t >= 1.0, width, ffn)
        ffn = np.where(ffn_frac > 0, np.maximum(ffn, self.ffn_step), self.min_ffn)
        return levels.astype(int), np.minimum(ffn, width).astype(int)

    def _params(self, levels: np.ndarray, ffn: np.ndarray) -> int:
        s = self.spec
        bias = 2 * ffn + s.hidden_size if s.mlp_bias else 0
        mlp = np.where(ffn > 0, 3 * s.hidden_size * ffn + bias + s.hidden_size, 0)  # == spec.mlp_params per layer
        return int(s.shared_params() + self.level_cost[levels].sum() + mlp.sum())

    def project(self, attn_frac, ffn_frac) -> Architecture:
        """The architecture closest in shape to the fractions that meets the budget (see module docstring).

        When the sublayers a candidate drops leave too little to spend the budget on, they are
        restored one by one (lowest layer first, at a small share) until the candidate fits.
        """
        attn_frac = np.clip(np.asarray(attn_frac, float), 0, 1)
        ffn_frac = np.clip(np.asarray(ffn_frac, float), 0, 1)
        arch = self._project(attn_frac, ffn_frac)
        while arch.params() < self.lower_bound() and ((attn_frac == 0).any() or (ffn_frac == 0).any()):
            share = ffn_frac if (ffn_frac == 0).any() else attn_frac
            share[np.argmax(share == 0)] = 0.05
            arch = self._project(attn_frac, ffn_frac)
        return arch

    def _project(self, attn_frac: np.ndarray, ffn_frac: np.ndarray) -> Architecture:
        wanted = np.concatenate([attn_frac, ffn_frac])
        lo, hi = 0.0, 1.0 / max(wanted[wanted > 0].min(initial=1.0), 1e-6)  # at t = hi every kept unit is full
        for _ in range(40):  # params(t) is nondecreasing in t: keep the largest t within budget
            mid = (lo + hi) / 2
            if self._params(*self._discretise(attn_frac, ffn_frac, mid)) <= self.budget:
                lo = mid
            else:
                hi = mid
        levels, ffn = self._discretise(attn_frac, ffn_frac, lo)
        if self._params(levels, ffn) > self.budget:
            raise InfeasibleBudgetError(f"no architecture with these kept sublayers fits {self.budget:,} parameters")
        self._fill(levels, ffn, attn_frac, ffn_frac)
        return self._architecture(levels, ffn)

    def _fill(self, levels: np.ndarray, ffn: np.ndarray, attn_frac: np.ndarray, ffn_frac: np.ndarray) -> None:
        """Spend the budget left after rounding, one step at a time, on kept sublayers that wanted the most."""
        s, gap = self.spec, self.budget - self._params(levels, ffn)
        order = np.argsort(-(attn_frac + ffn_frac), kind="stable")
        grew = True
        while grew and gap > 0:
            grew = False
            for i in order:
                if ffn[i] > 0 and ffn[i] < s.intermediate_size:
                    new = min(ffn[i] + self.ffn_step, s.intermediate_size)
                    cost = s.mlp_params(int(new)) - s.mlp_params(int(ffn[i]))
                    if cost <= gap:
                        ffn[i], gap, grew = new, gap - cost, True
                if 0 < levels[i] < len(self.levels) - 1:
                    cost = int(self.level_cost[levels[i] + 1] - self.level_cost[levels[i]])
                    if cost <= gap:
                        levels[i], gap, grew = levels[i] + 1, gap - cost, True
        if self._params(levels, ffn) < self.lower_bound():
            self._trade(levels, ffn, order)

    def _trade(self, levels: np.ndarray, ffn: np.ndarray, order: np.ndarray) -> None:
        """When attention steps are coarser than the gap: raise one layer's attention a level and pay
        for it with FFN channels of the layer that wanted the least, if that lands in the tolerance."""
        for i in order:
            if not 0 < levels[i] < len(self.levels) - 1:
                continue
            for j in order[::-1]:
                trial_levels, trial_ffn = levels.copy(), ffn.copy()
                trial_levels[i] += 1
                while trial_ffn[j] > self.ffn_step and self._params(trial_levels, trial_ffn) > self.budget:
                    trial_ffn[j] = max(self.ffn_step, (trial_ffn[j] - 1) // self.ffn_step * self.ffn_step)
                if self.lower_bound() <= self._params(trial_levels, trial_ffn) <= self.budget:
                    levels[:], ffn[:] = trial_levels, trial_ffn
                    return

    def _architecture(self, levels: np.ndarray, ffn: np.ndarray) -> Architecture:
        layers = tuple(LayerShape(*self.levels[lv], int(f)) for lv, f in zip(levels, ffn, strict=True))
        return Architecture(self.spec, layers)

    # ---- candidate generators ------------------------------------------------------------
    def uniform(self, dense_first: int = 0, dense_last: int = 0) -> Architecture:
        """The same ratio in every layer, nothing dropped (Torch-Pruning's default); with `dense_first` and
        `dense_last`, that many layers at either end stay whole and the others share the cut (LLM-Pruner's recipe:
        4 and 2 of LLaMA-7B's 32)."""
        n = self.spec.num_layers
        if dense_first + dense_last >= n:
            raise ValueError(f"{dense_first} + {dense_last} whole layers leave none of {n} to prune")
        share = np.ones(n)
        # project scales every share by one factor and caps it at 1: a tiny share for the pruned layers lets the
        # factor grow past 1, so the whole layers stay whole while the pruned ones keep whatever the budget allows
        share[dense_first : n - dense_last] = 1e-3 if dense_first or dense_last else 1.0
        return self.project(share, share)

    def threshold(self, importance: Importance) -> Architecture:
        """FLAP-style allocation: one global threshold on per-layer standardised unit scores."""
        z_heads = [_standardise(h.ravel()) for h in importance.heads]
        z_channels = [_standardise(c) for c in importance.channels]
        lo, hi = -50.0, 50.0
        for _ in range(60):  # higher threshold keeps fewer units
            tau = (lo + hi) / 2
            attn, ffn = _kept_share(z_heads, tau), _kept_share(z_channels, tau)
            if self._params(*self._discretise(attn, ffn, 1.0)) > self.budget:
                lo = tau
            else:
                hi = tau
        return self.project(_kept_share(z_heads, hi), _kept_share(z_channels, hi))

    def random(self, rng: np.random.Generator, drop_prob: float = 0.05, split: float | None = None) -> Architecture:
        """A random split of the cut between attention and FFN, then per-layer noise around it.

        The split (how much of the budget attention keeps versus the FFNs) is the largest single
        degree of freedom of structured pruning, so every candidate draws its own, from "full
        attention, thin FFNs" to the reverse; the noise then varies the allocation over depth.
        Each sublayer is dropped with `drop_prob` when dropping is allowed; `split` in [0, 1]
        fixes the split instead of drawing it (1: attention keeps everything it can).
        """
        n = self.spec.num_layers
        split = rng.uniform(0, 1) if split is None else split
        attn = np.clip(split + rng.normal(0, 0.25, n), 0.05, 1)
        ffn = np.clip(1 - split + rng.normal(0, 0.25, n), 0.05, 1)
        if self.allow_drop:
            attn[rng.random(n) < drop_prob] = 0
            ffn[rng.random(n) < drop_prob] = 0
        return self.project(attn, ffn)

    def mutate(self, arch: Architecture, rng: np.random.Generator, max_layers: int = 3) -> Architecture:
        """One move, then re-projection (the budget rebalances the rest): shift the attention/FFN
        split of every layer, nudge a few layers' shares, or drop or restore one sublayer."""
        attn, ffn = self.fractions(arch)
        move = rng.random()
        if move < 0.3:
            shift = rng.normal(0, 0.2)
            attn, ffn = np.clip(attn + shift, 0.05, 1), np.clip(ffn - shift, 0.05, 1)
        elif move < 0.9 or not self.allow_drop:
            for i in rng.choice(len(attn), size=rng.integers(1, max_layers + 1), replace=False):
                target = attn if rng.random() < 0.5 else ffn
                target[i] = np.clip(target[i] + rng.normal(0, 0.25), 0.05, 1)
        else:
            target = attn if rng.random() < 0.5 else ffn
            i = rng.integers(len(target))
            target[i] = 0.05 if target[i] == 0 else 0.0
        return self.project(attn, ffn)

    def swap(self, arch: Architecture, rng: np.random.Generator) -> Architecture:
        """A move in the discrete choices: one sublayer gives up some of its steps (attention levels or FFN
        widths), another takes as many; then the budget is repaired (the taker gives back what is over, the
        fill spends what is under). The number of steps is log-uniform up to a quarter of the giver's range,
        so most moves are small but some shift a large block of channels between layers. Sublayers are
        never dropped or restored here."""
        levels, ffn = self.indices(arch)  # (L,) each: attention level, FFN choice index
        choices = self.ffn_choices()
        tops = np.array([len(self.levels) - 1, len(choices) - 1])
        donor, taker = rng.choice(2 * len(levels), size=2, replace=False)
        reach = max(1, tops[donor // len(levels)] // 4)
        steps = max(1, int(np.exp(rng.uniform(0, np.log(reach + 1)))))
        for sub, sign in ((donor, -1), (taker, 1)):
            kind, i = divmod(sub, len(levels))
            index = levels if kind == 0 else ffn
            if index[i] > 0:  # a dropped sublayer stays dropped
                index[i] = np.clip(index[i] + sign * steps, 1, tops[kind])
        kind, i = divmod(taker, len(levels))
        index = levels if kind == 0 else ffn
        while self._params(levels, choices[ffn]) > self.budget and index[i] > 1:
            index[i] -= 1
        channels = choices[ffn]
        if self._params(levels, channels) <= self.budget:
            self._fill(levels, channels, *self.fractions(self._architecture(levels, channels)))
            candidate = self._architecture(levels, channels)
            if self.fits(candidate):
                return candidate
        return self.project(*self.fractions(self._architecture(levels, channels)))

    def indices(self, arch: Architecture) -> tuple[np.ndarray, np.ndarray]:
        """(attention level (L,), index into ffn_choices() (L,)) of an architecture of this space."""
        levels = np.array([self.levels.index((x.kv_heads, x.heads_per_group)) for x in arch.layers])
        return levels, np.searchsorted(self.ffn_choices(), [x.ffn_channels for x in arch.layers])

    def crossover(self, a: Architecture, b: Architecture, rng: np.random.Generator) -> Architecture:
        """Each layer's attention and FFN shares from one parent or the other."""
        (attn_a, ffn_a), (attn_b, ffn_b) = self.fractions(a), self.fractions(b)
        pick_attn, pick_ffn = rng.random(len(attn_a)) < 0.5, rng.random(len(ffn_a)) < 0.5
        return self.project(np.where(pick_attn, attn_a, attn_b), np.where(pick_ffn, ffn_a, ffn_b))


def _standardise(scores: np.ndarray) -> np.ndarray:
    std = scores.std()
    return (scores - scores.mean()) / (std if std > 0 else 1.0)


def _kept_share(z_per_layer: list[np.ndarray], tau: float) -> np.ndarray:
    return np.array([(z > tau).mean() for z in z_per_layer])
