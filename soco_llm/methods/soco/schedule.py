"""SoCo's schedule: the budget, temperature and penalty weights of every step (three stages), and
the soft size of the spectral layers with the global threshold that meets a budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import SoCoConfig
from .spectral import SpectralLinear


@dataclass
class StepPlan:
    stage: int
    keep_frac: float  # scheduled budget as a fraction of the dense decoder-linear parameters
    temperature: float
    polarize: float
    sparsity: float


def plan(cfg: SoCoConfig, step: int, full_frac: float) -> StepPlan:
    s1, s2, s3 = cfg.stages()
    target = 1.0 - cfg.ratio
    if step < s1:  # rapid compression, cosine from keep-all to the target
        a = 0.5 * (1 - math.cos(math.pi * (step + 1) / s1))
        return StepPlan(1, full_frac + (target - full_frac) * a, cfg.temperature, 0.0, 0.0)
    if step < s1 + s2:  # alternating refinement, the swing decays to zero
        t = step - s1
        sign = -1.0 if (t // max(cfg.alternate_every, 1)) % 2 == 0 else 1.0
        amp = cfg.alternate_amplitude * (1 - t / s2)
        return StepPlan(2, target * (1 + sign * amp), cfg.temperature, 0.0, 0.0)
    t = (step - s1 - s2 + 1) / max(s3, 1)  # decisive sparsification
    temp = cfg.temperature * (cfg.final_temperature / cfg.temperature) ** t
    return StepPlan(3, target, temp, cfg.polarize_weight * t, cfg.sparsity_weight * t)


class SizeModel:
    """Soft parameter count of all spectral layers, and the threshold that meets a budget.

    Everything per component stays on the layers' device; the solve runs there with no host sync.
    """

    def __init__(self, layers: dict[str, SpectralLinear], added_bias: bool):
        self.layers = layers
        self.dense = sum(l.out_features * l.in_features for l in layers.values())
        self.fixed = sum(l.out_features for l in layers.values()) if added_bias else 0
        self.total_cost = sum(l.k * (l.out_features + l.in_features) for l in layers.values())  # keep-all size
        device = next(iter(layers.values())).scores.device
        self.cost = torch.cat([torch.full((l.k,), float(l.out_features + l.in_features), device=device)
                               for l in layers.values()])

    def log_importance(self) -> torch.Tensor:
        return torch.cat([torch.log(l.importance().detach().float() + 1e-30) for l in self.layers.values()])

    def soft(self) -> torch.Tensor:
        """Differentiable soft size (parameters), through the gates."""
        return sum((l.out_features + l.in_features) * l.soft_gate().sum() for l in self.layers.values()) + self.fixed

    def solve_threshold(self, budget: float, temperature: float) -> torch.Tensor | float:
        """log θ such that Σ cost·sigmoid((log I − log θ)/T) + fixed = budget (60 bisection steps, in fp64 like
        the host loop it replaced); −inf when the budget covers every component."""
        target = budget - self.fixed
        if target >= self.total_cost:
            return float("-inf")  # the budget covers everything: all gates open
        li = self.log_importance()
        lo = li.min().double() - 40 * temperature
        hi = li.max().double() + 40 * temperature
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            over = (self.cost * torch.sigmoid((li - mid) / temperature)).sum().double() > target
            lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
        return 0.5 * (lo + hi)
