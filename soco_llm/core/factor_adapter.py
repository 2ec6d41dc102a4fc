"""A low-rank adapter on the factors of a `LowRankLinear`, for healing: A ← A + Uₐ·Vₐ and B ← B + U_b·V_b.

Each factor gets its own update of rank ≤ `rank` (LoRA on each factor, as SVD-LLM heals its U and V),
so merging it back is exact and leaves the layer's shapes, and so the compressed size, unchanged;
an update of the product B·A instead would raise its rank. The update is a parametrization of the
factor: the layer's forward pass is untouched, and `merge_factor_adapters` folds it into the factor.
U starts at zero, so healing starts from the cut model. The adapter trains in float32 whatever
the model's dtype (Adam on bf16 numbers loses small updates) and follows its factor's device.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layer import LowRankLinear

FACTORS = ("A", "B")


class FactorUpdate(nn.Module):
    """X ↦ X + up·down for one factor X (rows × cols); `up` starts at zero."""

    def __init__(self, factor: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__()
        rows, cols = factor.shape
        r = max(1, min(rank, rows, cols))
        # Drawn by a host generator, then moved beside its factor: the same draw on every device (a resumed
        # run must rebuild the same adapters), and meta tensors have no generator of their own.
        down = torch.randn(r, cols, generator=generator, dtype=torch.float32, device="cpu") / math.sqrt(cols)
        self.down = nn.Parameter(down.to(factor.device))
        self.up = nn.Parameter(torch.zeros(rows, r, dtype=torch.float32, device=factor.device))

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return factor + (self.up @ self.down).to(factor.dtype)


def attach_factor_adapters(layers: dict[str, LowRankLinear], rank: int, seed: int) -> dict[str, nn.Parameter]:
    """Give every layer's A and B an update of rank ≤ `rank`; returns the adapters' parameters by name
    (`layer.A.up`, ...), the only ones that train. The random halves are drawn from `seed`, so a resumed
    run rebuilds the same adapters before it loads their checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    params: dict[str, nn.Parameter] = {}
    for name, layer in layers.items():
        for f in FACTORS:
            update = FactorUpdate(getattr(layer, f).detach(), rank, gen)
            parametrize.register_parametrization(layer, f, update)
            params[f"{name}.{f}.up"], params[f"{name}.{f}.down"] = update.up, update.down
    return params


@torch.no_grad()
def merge_factor_adapters(layers: dict[str, LowRankLinear]) -> None:
    """Fold every update into its factor (exact) and remove the adapters: plain LowRankLinear layers again."""
    for layer in layers.values():
        for f in FACTORS:
            if parametrize.is_parametrized(layer, f):
                parametrize.remove_parametrizations(layer, f, leave_parametrized=True)
