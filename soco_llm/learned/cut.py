"""The cut of a learned method's spectral layers: keep the globally most important components at an exact
parameter budget, fold √(σ·s) into both factors and the deviation d into the bias, and swap in ordinary
LowRankLinear layers. The re-cut of a finished run (`recut.py`) is this same cut at another ratio."""

from __future__ import annotations

import torch
from torch import nn

from ..core.adapter import replace_module
from ..core.decompose import Decomposition
from ..core.budget import LayerRank, budget_params, global_cut
from ..core.layer import LowRankLinear
from .spectral import SpectralLinear


@torch.no_grad()
def kept_components(layers: dict[str, SpectralLinear], ratio: float, deviation: bool,
                    multiple: int = 1) -> dict[str, torch.Tensor]:
    """The global cut by learned importance at the exact parameter budget of `ratio`: a keep-mask per layer."""
    shapes = {n: (l.out_features, l.in_features) for n, l in layers.items()}
    budget = budget_params(sum(m * n for m, n in shapes.values()), ratio)
    return global_cut({n: l.importance() for n, l in layers.items()}, shapes, budget, deviation, multiple)


@torch.no_grad()
def set_masks(layers: dict[str, SpectralLinear], kept: dict[str, torch.Tensor]) -> None:
    for name, l in layers.items():
        l.mask.copy_(kept[name])


@torch.no_grad()
def cut(model: nn.Module, layers: dict[str, SpectralLinear], ratio: float, deviation: bool,
        multiple: int = 1) -> list[LayerRank]:
    """Global cut by learned importance to the exact budget; fold √(σ·s) and d; swap in LowRankLinear."""
    kept = kept_components(layers, ratio, deviation, multiple)
    rows = []
    for name, l in layers.items():
        idx = torch.nonzero(kept[name]).squeeze(1)  # ascending, as the factors keep σ's order
        spec = Decomposition(l.left[:, idx].double(), l.spectrum()[idx], l.right[idx].double() / l.scale)
        A, B = spec.factors(idx.numel(), l.scores[idx].double())
        bias = l.orig_bias.double() if l.orig_bias is not None else None
        if deviation:
            bias = l.deviation.double() if bias is None else bias + l.deviation.double()
        dtype = l.left.dtype
        replace_module(model, name, LowRankLinear.from_factors(A.to(dtype), B.to(dtype),
                                                               None if bias is None else bias.to(dtype), l.dense_cls))
        rows.append(LayerRank(name, l.out_features, l.in_features, idx.numel(), deviation))
    return rows
