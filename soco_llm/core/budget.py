"""Parameter budgets: ratio accounting, rank rules and the global cut, exactly as METHOD.md defines them.

ratio = 1 − new/old over the linear layers inside the decoder blocks (embeddings and LM head
excluded). old = Σ m·n; new = Σ r·(m+n) (+ m for a deviation d) for compressed layers and
m·n for layers left dense. Rank 0 marks a dense layer.

`deviation` (one name for it everywhere): a compressed layer that carries a trained deviation d, a bias
added to its output (SoCo's), pays m more parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SocoError

RATIO_DEFINITION = (
    "ratio = 1 - new/old over decoder-block linear weights only (embeddings and LM head excluded); "
    "old = sum m*n; new = sum r*(m+n) (+m for a deviation d) for compressed layers, m*n for dense ones"
)


def bias_cost(m: int, deviation: bool) -> int:
    """What a deviation d costs a compressed m×n layer."""
    return m if deviation else 0


def max_useful_rank(m: int, n: int, deviation: bool = False) -> int:
    """The largest rank at which the factored layer is still smaller than the dense one."""
    return max((m * n - bias_cost(m, deviation) - 1) // (m + n), 0)


def uniform_rank(m: int, n: int, ratio: float, multiple: int = 1) -> int:
    """The baselines' rank rule: r = ⌊m·n·(1−ratio)/(m+n)⌋, at least 1; with `multiple`, rounded down to a
    multiple of it (so the layer never costs more than its share of the budget), unless that would be 0."""
    r = max(int(m * n * (1.0 - ratio) // (m + n)), 1)
    return r - r % multiple if r >= multiple else r


def layer_params(m: int, n: int, rank: int, deviation: bool = False) -> int:
    """Parameters a layer costs at `rank`; dense (m·n) when rank is 0 or would not shrink it."""
    cost = rank * (m + n) + bias_cost(m, deviation)
    return m * n if rank <= 0 or cost >= m * n else cost


def settle_rank(m: int, n: int, rank: int, deviation: bool = False) -> int:
    """Keep the rank only where the factored layer is smaller; otherwise 0 (dense)."""
    return rank if 0 < rank and rank * (m + n) + bias_cost(m, deviation) < m * n else 0


def budget_params(dense_params: int, ratio: float) -> int:
    """The parameter budget that meets `ratio` exactly (never above it)."""
    return int(math.floor((1.0 - ratio) * dense_params))


@dataclass
class LayerRank:
    name: str
    out_features: int
    in_features: int
    rank: int  # 0 = left dense
    deviation: bool = False  # a compressed layer also pays m for a deviation d

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def params(self) -> int:
        return layer_params(self.out_features, self.in_features, self.rank, self.deviation)


def achieved_ratio(layers: list[LayerRank]) -> float:
    """The global ratio the layers reach."""
    old = sum(layer.dense_params for layer in layers)
    return 1.0 - sum(layer.params for layer in layers) / old


def rank_table(layers: list[LayerRank]) -> list[dict]:
    """One row per layer for reports (the saved compression_report.json format)."""
    return [{"name": x.name, "out_features": x.out_features, "in_features": x.in_features, "rank": x.rank,
             "params": x.params, "dense_params": x.dense_params, "ratio": 1.0 - x.params / x.dense_params}
            for x in layers]


def check_reachable(shapes: dict[str, tuple[int, int]], budget: int, deviation: bool = False,
                    multiple: int = 1) -> None:
    """Fail clearly when even one component (`multiple` of them) per layer, plus its bias, exceeds the budget."""
    least = sum(multiple * (m + n) + bias_cost(m, deviation) for m, n in shapes.values())
    if least > budget:
        old = sum(m * n for m, n in shapes.values())
        raise SocoError(f"ratio {1 - budget / old:.3f} is out of reach: one component per layer already costs "
                        f"ratio {1 - least / old:.3f}; choose a ratio below that")


def _first_per_layer(flat: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """A mask of each layer's most important component (its first index among equal maxima, as argmax)."""
    best = torch.segment_reduce(flat, "max", lengths=sizes)
    is_best = flat == torch.repeat_interleave(best, sizes)
    if int(is_best.sum()) == sizes.numel():  # no ties for a maximum: one per layer
        return is_best
    layer = torch.repeat_interleave(torch.arange(sizes.numel(), device=flat.device), sizes)
    idx = torch.arange(flat.numel(), device=flat.device)
    first = torch.full((sizes.numel(),), flat.numel(), device=flat.device).scatter_reduce(
        0, layer, torch.where(is_best, idx, flat.numel()), "amin")
    mask = torch.zeros_like(is_best)
    mask[first] = True
    return mask


def _beyond_caps(flat: torch.Tensor, sizes: torch.Tensor, first: torch.Tensor, caps: list[int]) -> torch.Tensor:
    """A mask of the non-first components a layer can never take: all but its best `cap − 1` (only layers
    with more than `cap` components have any; with SoCo's capped basis there are none)."""
    layer = torch.repeat_interleave(torch.arange(sizes.numel(), device=flat.device), sizes)
    cap = torch.tensor(caps, device=flat.device)
    sub = torch.nonzero((sizes > cap)[layer] & ~first).squeeze(1)
    by_imp = sub[torch.argsort(flat[sub], descending=True, stable=True)]
    grouped = by_imp[torch.argsort(layer[by_imp], stable=True)]
    counts = torch.bincount(layer[grouped], minlength=sizes.numel())
    rank = torch.arange(grouped.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[layer[grouped]]
    out = torch.zeros_like(first)
    out[grouped] = rank >= cap[layer[grouped]] - 1
    return out


def _greedy(flat: torch.Tensor, cost: torch.Tensor, live: torch.Tensor, kept: torch.Tensor, used: torch.Tensor,
            budget: int, rounds: int) -> torch.Tensor:
    """Add to `kept`, in descending `flat`, every live item that still fits the budget (see `global_cut`).

    `live`: fp64, the cost of each item the greedy may still take, 0 for the others.
    """
    bins = flat.view(torch.int32) >> 16  # 2^15 bins, about 1 % apart, ordered like the values (all >= 0)
    for _ in range(rounds):
        above = torch.bincount(bins, weights=live, minlength=1 << 15)
        above = torch.cat([above.flip(0).cumsum(0).flip(0), above.new_zeros(1)])  # cost of live ones in bins >= b
        crossing = int((above > budget - used).sum()) - 1  # the highest bin where the budget runs out
        if crossing < 0:  # everything left fits
            return kept | (live > 0)
        higher = bins > crossing
        kept = kept | (higher & (live > 0))
        used = used + above[crossing + 1].long()
        cand = torch.nonzero((bins == crossing) & (live > 0)).squeeze(1)
        cand = cand[torch.argsort(flat[cand], descending=True, stable=True)]
        n_fit = int((used + torch.cumsum(cost[cand], 0) <= budget).sum())  # a prefix: the sum only grows
        kept[cand[:n_fit]] = True
        used = used + cost[cand[:n_fit]].sum()
        live[cand[:n_fit]] = 0
        # What did not fit, and anything after it that costs as much, is out; only cheaper ones may still fit.
        live.masked_fill_(higher | (cost >= cost[cand[n_fit]]), 0)
    return kept


def _groups(flat: torch.Tensor, sizes: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each layer's components in descending importance, cut into groups of `multiple`:
    (group of each component, mean importance of each group, rank of each group within its layer)."""
    layer = torch.repeat_interleave(torch.arange(sizes.numel(), device=flat.device), sizes)
    by_imp = torch.argsort(flat, descending=True, stable=True)
    order = by_imp[torch.argsort(layer[by_imp], stable=True)]  # by layer, then by importance
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(flat.numel(), device=flat.device) - starts[layer[order]]
    per_layer = (sizes + multiple - 1) // multiple
    group_of_sorted = (torch.cumsum(per_layer, 0) - per_layer)[layer[order]] + rank // multiple
    group = torch.empty_like(group_of_sorted)
    group[order] = group_of_sorted
    n_groups = int(per_layer.sum())
    mean = torch.zeros(n_groups, device=flat.device).index_add_(0, group, flat) / torch.bincount(group, minlength=n_groups)
    group_rank = torch.arange(n_groups, device=flat.device) - torch.repeat_interleave(
        torch.cumsum(per_layer, 0) - per_layer, per_layer)
    return group, mean, group_rank


def global_cut(importance: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int,
               deviation: bool = False, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Keep the most important components over all layers until the parameter budget is met.

    Greedy in descending importance (importances are >= 0): a component of an m×n layer costs m+n and
    is kept if it still fits the budget; a compressed layer also pays m for its deviation d when
    `deviation`. Every layer keeps at least its best component, and never grows to a size that is
    not smaller than dense. Returns a boolean keep-mask per layer, on the importances' device.
    With `multiple` > 1 every layer keeps a multiple of that many components (hardware-friendly
    ranks): the greedy then takes each layer's components `multiple` at a time, best first, ranked
    by the group's mean importance, and every layer keeps at least its best group.

    Vectorised without sorting all components (a full sort of a 7B model's ~550k components costs
    more than the rest of the cut): the greedy keeps everything above a crossing point and, after
    a component that does not fit, only cheaper components can still fit. So each round finds the
    crossing with a cost histogram over the float bits of the importances (monotone for values
    >= 0), sorts only the components in the crossing bin, and drops every later component that
    costs as much as the one that did not fit. Rounds <= distinct layer costs + 1, each a few
    device syncs. Ties are broken by layer order, then component index.
    """
    check_reachable(shapes, budget, deviation, multiple)
    names = list(shapes)
    dims = [shapes[n] for n in names]
    flat = torch.cat([importance[n].detach().float().reshape(-1) for n in names])
    # abs: −0.0 sorts as 0; a NaN (a diverged step, caught by the trainer at its next check) counts as 0
    flat = torch.nan_to_num(flat.abs(), nan=0.0)
    device = flat.device
    sizes = torch.tensor([importance[n].numel() for n in names], device=device)
    layer_cost = torch.tensor([m + n for m, n in dims], device=device)
    caps = [max_useful_rank(m, n, deviation) for m, n in dims]
    extra = sum(bias_cost(m, deviation) for m, n in dims)
    rounds = len({m + n for m, n in dims}) + 1
    if multiple == 1:
        cost = torch.repeat_interleave(layer_cost, sizes)
        first = _first_per_layer(flat, sizes)
        live = cost.double().masked_fill(first, 0)
        if any(importance[n].numel() > c for n, c in zip(names, caps)):
            live.masked_fill_(_beyond_caps(flat, sizes, first, caps), 0)
        used = torch.tensor(int(layer_cost.sum()) + extra, device=device)
        kept = _greedy(flat, cost, live, first.clone(), used, budget, rounds)
        return dict(zip(names, kept.split(sizes.tolist())))
    group, mean, group_rank = _groups(flat, sizes, multiple)
    per_layer = (sizes + multiple - 1) // multiple
    group_layer = torch.repeat_interleave(torch.arange(len(names), device=device), per_layer)
    count = torch.bincount(group, minlength=mean.numel())
    cost = count * layer_cost[group_layer]
    first = group_rank == 0
    cap_groups = torch.tensor([c // multiple for c in caps], device=device)[group_layer]
    live = cost.double().masked_fill(first | (count < multiple) | (group_rank >= cap_groups), 0)
    used = cost[first].sum() + extra
    kept_groups = _greedy(mean, cost, live, first.clone(), used, budget, len({multiple * (m + n) for m, n in dims}) + 1)
    return dict(zip(names, kept_groups[group].split(sizes.tolist())))
