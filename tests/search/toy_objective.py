"""A toy objective, added the way a new one is: one class plus one registration line.

Importing this module registers it, so the conformance suite (which imports it) tests it as it tests the
shipped ones; a run can then ask for `--objective top1`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from search.objectives import Objective, Score, register_objective


@dataclass
class TopOneAccuracy(Objective):
    """Share of next tokens the model ranks first on the evaluation windows (maximised)."""

    windows: torch.Tensor  # (N, T)
    batch_size: int = 8

    name = "top1"
    direction = "maximize"

    @torch.inference_mode()
    def __call__(self, model) -> Score:
        device = next(model.parameters()).device
        hits = 0
        for start in range(0, len(self.windows), self.batch_size):
            ids = self.windows[start : start + self.batch_size].to(device)  # (B, T)
            hits += int((model(input_ids=ids).logits[:, :-1].argmax(-1) == ids[:, 1:]).sum())
        return Score(hits / (self.windows.shape[0] * (self.windows.shape[1] - 1)))

    @classmethod
    def study_settings(cls, config) -> None:
        return None

    @classmethod
    def from_config(cls, config, setup, split: str, checked=None) -> TopOneAccuracy:
        return cls(setup.search_windows if split == "search" else setup.held_out_windows, config.batch_size)


register_objective(name="top1", objective_cls=TopOneAccuracy)
