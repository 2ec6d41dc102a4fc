"""Parameter budgets: ratio accounting, rank rules and the global cut, exactly as METHOD.md defines them.

ratio = 1 − new/old over the linear layers inside the decoder blocks (embeddings and LM head
excluded). old = Σ m·n; new = Σ r·(m+n) (+ m for an added bias d) for compressed layers and
m·n for layers left dense. Rank 0 marks a dense layer.

One name for the cost of d everywhere: `added_bias` — a compressed layer that carries an added
bias d (SoCo's deviation) pays m more parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import SocoError

RATIO_DEFINITION = (
    "ratio = 1 - new/old over decoder-block linear weights only (embeddings and LM head excluded); "
    "old = sum m*n; new = sum r*(m+n) (+m for an added bias d) for compressed layers, m*n for dense ones"
)


def bias_cost(m: int, added_bias: bool) -> int:
    """What an added bias d costs a compressed m×n layer."""
    return m if added_bias else 0


def max_useful_rank(m: int, n: int, added_bias: bool = False) -> int:
    """The largest rank at which the factored layer is still smaller than the dense one."""
    return max((m * n - bias_cost(m, added_bias) - 1) // (m + n), 0)


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """The baselines' rank rule: r = ⌊m·n·(1−ratio)/(m+n)⌋, at least 1."""
    return max(int(m * n * (1.0 - ratio) // (m + n)), 1)


def layer_params(m: int, n: int, rank: int, added_bias: bool = False) -> int:
    """Parameters a layer costs at `rank`; dense (m·n) when rank is 0 or would not shrink it."""
    cost = rank * (m + n) + bias_cost(m, added_bias)
    return m * n if rank <= 0 or cost >= m * n else cost


def settle_rank(m: int, n: int, rank: int, added_bias: bool = False) -> int:
    """Keep the rank only where the factored layer is smaller; otherwise 0 (dense)."""
    return rank if 0 < rank and rank * (m + n) + bias_cost(m, added_bias) < m * n else 0


def budget_params(dense_params: int, ratio: float) -> int:
    """The parameter budget that meets `ratio` exactly (never above it)."""
    return int(math.floor((1.0 - ratio) * dense_params))


@dataclass
class LayerRank:
    name: str
    out_features: int
    in_features: int
    rank: int  # 0 = left dense
    added_bias: bool = False  # a compressed layer also pays m for an added bias d

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def params(self) -> int:
        return layer_params(self.out_features, self.in_features, self.rank, self.added_bias)


def achieved_ratio(layers: list[LayerRank]) -> float:
    """The global ratio the layers reach."""
    old = sum(layer.dense_params for layer in layers)
    return 1.0 - sum(layer.params for layer in layers) / old


def rank_table(layers: list[LayerRank]) -> list[dict]:
    """One row per layer for reports (the saved compression_report.json format)."""
    return [{"name": x.name, "out_features": x.out_features, "in_features": x.in_features, "rank": x.rank,
             "params": x.params, "dense_params": x.dense_params, "ratio": 1.0 - x.params / x.dense_params}
            for x in layers]


def check_reachable(shapes: dict[str, tuple[int, int]], budget: int, added_bias: bool = False) -> None:
    """Fail clearly when even one component per layer (plus its bias) exceeds the budget."""
    least = sum(m + n + bias_cost(m, added_bias) for m, n in shapes.values())
    if least > budget:
        old = sum(m * n for m, n in shapes.values())
        raise SocoError(f"ratio {1 - budget / old:.3f} is out of reach: one component per layer already costs "
                        f"ratio {1 - least / old:.3f}; choose a ratio below that")


def global_cut(importance: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int,
               added_bias: bool = False) -> dict[str, list[int]]:
    """Keep the most important components over all layers until the parameter budget is met.

    A component of an m×n layer costs m+n; a compressed layer also pays m for its bias d when
    `added_bias`. Every layer keeps at least its best component, and never grows to a size
    that is not smaller than dense. Returns the kept component indices per layer.
    """
    check_reachable(shapes, budget, added_bias)
    extra = {name: bias_cost(m, added_bias) for name, (m, n) in shapes.items()}
    kept = {name: [int(torch.argmax(importance[name]))] for name in shapes}
    used = sum(m + n + extra[name] for name, (m, n) in shapes.items())
    names, flat_imp, flat_idx = [], [], []
    for li, name in enumerate(shapes):
        imp = importance[name].detach().float().cpu()
        order = torch.argsort(imp, descending=True)[1:]  # the best one is already kept
        names.append(name)
        flat_imp.append(imp[order])
        flat_idx.append(torch.stack([torch.full_like(order, li), order], 1))
    imp = torch.cat(flat_imp)
    idx = torch.cat(flat_idx)[torch.argsort(imp, descending=True, stable=True)]
    cheapest = min(m + n for m, n in shapes.values())
    for li, ci in idx.tolist():
        if budget - used < cheapest:
            break
        name = names[li]
        m, n = shapes[name]
        r = len(kept[name])
        if used + m + n > budget or (r + 1) * (m + n) + extra[name] >= m * n:
            continue
        kept[name].append(ci)
        used += m + n
    return kept
