"""Dynamic batch loading (Sheared-LLaMA, Xia et al. 2023, Alg. 1) over named training domains.

Every `update_every` steps the sampling weights move toward the domains whose
loss is furthest above the dense model's loss on them:

    Δ_d = max(L_d - ref_d, 0)
    w_d ← w_d · exp(η · Δ_d),   w ← (1 - c) · w / Σ w + c / D          (c: smoothing, D domains)

L_d is the mean training loss of the rows drawn from domain d since the last
update (the previous estimate when none was drawn); ref_d is the dense model's
loss on the same rows (`finetune.distill.dense_reference`), so the gap measures
what pruning lost there rather than how hard the domain is.
"""

from __future__ import annotations

import numpy as np

SMOOTHING = 1e-4


def update_weights(weights: np.ndarray, losses: np.ndarray, reference: np.ndarray, eta: float,
                   smoothing: float = SMOOTHING) -> np.ndarray:
    """One Sheared-LLaMA update of the domain weights (D,); returns new weights summing to 1."""
    excess = np.maximum(losses - reference, 0.0)
    logits = np.log(weights) + eta * excess  # multiplicative update in log space (no overflow)
    w = np.exp(logits - logits.max())
    return (1 - smoothing) * w / w.sum() + smoothing / len(w)


class DomainSampler:
    """Draws (domain, row) pairs by the current weights and updates the weights from observed losses.

    Rows of a domain are visited in a fresh random permutation each pass, so every
    row is seen before any repeats.
    """

    def __init__(self, sizes: list[int], reference: list[float], eta: float, update_every: int, seed: int):
        self.sizes, self.reference = sizes, np.asarray(reference, dtype=np.float64)
        self.eta, self.update_every = eta, update_every
        self.rng = np.random.default_rng(seed)
        self.weights = np.full(len(sizes), 1.0 / len(sizes))
        self.estimates = self.reference.copy()  # no excess until a domain has been observed
        self._sums, self._counts = np.zeros(len(sizes)), np.zeros(len(sizes))
        self._orders = [self.rng.permutation(n) for n in sizes]
        self._cursor = [0] * len(sizes)
        self.history = [tuple(float(x) for x in self.weights)]

    def sample(self, batch_size: int) -> list[tuple[int, int]]:
        domains = self.rng.choice(len(self.sizes), size=batch_size, p=self.weights)
        return [(int(d), self._next_row(int(d))) for d in domains]

    def _next_row(self, d: int) -> int:
        if self._cursor[d] == self.sizes[d]:
            self._orders[d], self._cursor[d] = self.rng.permutation(self.sizes[d]), 0
        self._cursor[d] += 1
        return int(self._orders[d][self._cursor[d] - 1])

    def observe(self, domain: int, nll_sum: float, tokens: int) -> None:
        self._sums[domain] += nll_sum
        self._counts[domain] += tokens

    def step(self, step: int) -> None:
        """Call after training step `step` (1-based); updates the weights every `update_every` steps."""
        if step % self.update_every:
            return
        seen = self._counts > 0
        self.estimates[seen] = self._sums[seen] / self._counts[seen]
        self.weights = update_weights(self.weights, self.estimates, self.reference, self.eta)
        self._sums[:], self._counts[:] = 0.0, 0.0
        self.history.append(tuple(float(x) for x in self.weights))
