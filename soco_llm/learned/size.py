"""The size model of a learned method's spectral layers: their soft parameter count through the gates, and
the global gate threshold that meets a parameter budget (solved on the device every step)."""

from __future__ import annotations

import torch

from .spectral import SpectralLinear


class SizeModel:
    """Soft parameter count of all spectral layers, and the threshold that meets a budget.

    Everything per component stays on the layers' device; the solve runs there with no host sync.
    """

    def __init__(self, layers: dict[str, SpectralLinear], deviation: bool):
        self.layers = layers
        self.dense = sum(l.out_features * l.in_features for l in layers.values())
        self.fixed = sum(l.out_features for l in layers.values()) if deviation else 0
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
