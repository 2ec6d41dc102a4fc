"""What healing trains on the factors of a `LowRankLinear`, as parametrizations of them, folded back at the end.

- A low-rank adapter (heal mode "adapter"): A ← A + Uₐ·Vₐ and B ← B + U_b·V_b. Each factor gets its
  own update of rank ≤ `rank` (LoRA on each factor, as SVD-LLM heals its U and V), so merging it back
  is exact and leaves the layer's shapes, and so the compressed size, unchanged; an update of the
  product B·A instead would raise its rank. U starts at zero, so healing starts from the cut model.
- The factors themselves (heal mode "factors"): a float32 factor trains as it is; a bf16 / fp16 one
  trains as a float32 master copy that the layer reads cast to its dtype (mixed precision's master
  weights), since Adam's small steps are rounded away on bf16 numbers (at lr 3e-5 a step is below
  the spacing of bf16 numbers near most weights).

The layer's forward pass is untouched, every trained tensor is float32 and follows its factor's
device, and `merge_factor_parametrizations` leaves plain factors of the model's dtype again.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layer import LowRankLinear

FACTORS = ("A", "B")
TENSORS = (*FACTORS, "bias")  # what factor healing trains, by the name it has in checkpoints


def _owner(layer: LowRankLinear, tensor: str) -> tuple[nn.Module, str]:
    """(module, attribute) holding `tensor` of `layer`: A and B are the factors' `nn.Linear` weights, the
    bias is B's."""
    return (layer.B, "bias") if tensor == "bias" else (getattr(layer, tensor), "weight")


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


class FactorMaster(nn.Module):
    """X ↦ master in X's dtype, `master` a float32 copy of the factor. The factor's own storage is
    dropped while it is attached (`right_inverse` keeps an empty tensor): the master holds its values."""

    def __init__(self, factor: torch.Tensor):
        super().__init__()
        self.master = nn.Parameter(factor.detach().float().clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.master.to(original.dtype)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value.new_empty(0)


def attach_factor_masters(layers: dict[str, LowRankLinear]) -> dict[str, nn.Parameter]:
    """The float32 tensors factor healing trains, by name (`layer.A`, `layer.B`, `layer.bias`:
    the factors' weights and B's bias): a float32
    factor itself, a float32 master copy (a parametrization) of a factor in another dtype."""
    params: dict[str, nn.Parameter] = {}
    for name, layer in layers.items():
        for t in TENSORS:
            owner, attr = _owner(layer, t)
            p = getattr(owner, attr)
            if p is None:
                continue
            if p.dtype != torch.float32:
                master = FactorMaster(p)
                parametrize.register_parametrization(owner, attr, master)
                p = master.master
            params[f"{name}.{t}"] = p
    return params


def attach_factor_adapters(layers: dict[str, LowRankLinear], rank: int, seed: int) -> dict[str, nn.Parameter]:
    """Give every layer's A and B an update of rank ≤ `rank`; returns the adapters' parameters by name
    (`layer.A.up`, ...), the only ones that train. The random halves are drawn from `seed`, so a resumed
    run rebuilds the same adapters before it loads their checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    params: dict[str, nn.Parameter] = {}
    for name, layer in layers.items():
        for f in FACTORS:
            owner, attr = _owner(layer, f)
            update = FactorUpdate(getattr(owner, attr).detach(), rank, gen)
            parametrize.register_parametrization(owner, attr, update)
            params[f"{name}.{f}.up"], params[f"{name}.{f}.down"] = update.up, update.down
    return params


@torch.no_grad()
def merge_factor_parametrizations(layers: dict[str, LowRankLinear]) -> None:
    """Fold every adapter or master copy into its factor (an adapter exactly; a master rounded to the
    factor's dtype) and remove it: plain LowRankLinear layers again."""
    for layer in layers.values():
        for t in TENSORS:
            owner, attr = _owner(layer, t)
            if parametrize.is_parametrized(owner, attr):
                parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
