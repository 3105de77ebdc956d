"""The sensitivity knapsack: one level per sublayer that minimises the additive cost under the budget.

A multiple-choice knapsack over the search space's discrete choices, solved exactly as a
0/1 integer programme with scipy's `milp` (HiGHS):

    x[i, a] = 1 if layer i keeps attention level a       (L, A+1)
    y[i, f] = 1 if layer i keeps the f-th FFN width       (L, F)
    minimise   sum cost_attn[i, a] x[i, a] + sum cost_ffn[i, f] y[i, f]
    subject to sum_a x[i, a] = 1,  sum_f y[i, f] = 1                       for every layer i
               budget (1 - tolerance) <= shared + sum params * (x, y) <= budget

Costs come from a `SensitivityTable` (`level_costs`); the sampler re-solves with costs it
perturbs or corrects. "Exactly" is up to HiGHS's relative gap, `MIP_GAP`.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from pruning.architecture import Architecture, LayerShape
from pruning.sensitivity import SensitivityTable
from search.space import InfeasibleBudgetError, SearchSpace

# HiGHS stops within this share of the optimum's cost: on SmolLM2's table (30 layers, 193 FFN widths each) a solve
# took 0.58 s against 2.03 s at HiGHS's own 1e-4, the same architectures on 5 of 5 tilts; 0.1% of the additive
# cost is far below the table's own error (the search finds 15-20% below the knapsack's perplexity)
MIP_GAP = 1e-3


def level_costs(space: SearchSpace, table: SensitivityTable) -> tuple[np.ndarray, np.ndarray]:
    """(attention (L, A+1) over space.levels, FFN (L, F) over space.ffn_choices()) additive costs."""
    n = space.spec.num_layers
    attn = np.array([[table.attention_cost(i, kv, h) for kv, h in space.levels] for i in range(n)])
    ffn = np.array([[table.ffn_cost(i, int(c)) for c in space.ffn_choices()] for i in range(n)])
    return attn, ffn


def solve(space: SearchSpace, attn_cost: np.ndarray, ffn_cost: np.ndarray) -> Architecture:
    """The architecture of `space` with the least total cost whose parameters fit the budget's tolerance."""
    s, widths = space.spec, space.ffn_choices()
    n, a, f = s.num_layers, len(space.levels), len(widths)
    scale = float(space.budget)  # parameters enter the constraint in units of the budget
    size = np.concatenate([space.level_cost, [s.mlp_params(int(c)) for c in widths]]) / scale  # (A+1+F,)
    one_per_sublayer = np.zeros((2 * n, n * (a + f)))  # row i: layer i's attention, row n + i: its FFN
    for i in range(n):
        one_per_sublayer[i, i * a : (i + 1) * a] = 1
        one_per_sublayer[n + i, n * a + i * f : n * a + (i + 1) * f] = 1
    params = np.concatenate([np.tile(size[:a], n), np.tile(size[a:], n)])[None]  # (1, n(A+1) + nF)
    shared = s.shared_params() / scale
    upper = np.ones(n * (a + f))
    upper[: n * a] = np.tile(np.arange(a) >= space.min_level, n)
    upper[n * a :] = np.tile(widths >= space.min_ffn, n)
    result = milp(
        np.concatenate([attn_cost.ravel(), ffn_cost.ravel()]),
        integrality=np.ones(n * (a + f)),
        bounds=Bounds(0, upper),
        constraints=[LinearConstraint(one_per_sublayer, 1, 1),
                     LinearConstraint(params, space.lower_bound() / scale - shared, 1 - shared)],
        options={"time_limit": 60, "mip_rel_gap": MIP_GAP},
    )
    if result.x is None:
        raise InfeasibleBudgetError(f"no architecture of this space fits {space.budget:,} parameters: {result.message}")
    x = result.x.round().astype(int)
    levels = x[: n * a].reshape(n, a).argmax(1)
    channels = widths[x[n * a :].reshape(n, f).argmax(1)]
    arch = Architecture(s, tuple(LayerShape(*space.levels[lv], int(c)) for lv, c in zip(levels, channels, strict=True)))
    if not space.fits(arch):  # rounding of the relaxation's tolerance; the projection lands it exactly
        arch = space.project(*space.fractions(arch))
    return arch


def knapsack(space: SearchSpace, table: SensitivityTable) -> Architecture:
    """The rival: the sensitivity table's additive cost minimised under the budget."""
    return solve(space, *level_costs(space, table))
