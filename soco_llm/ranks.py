"""Ratio accounting and rank allocation, exactly as METHOD.md defines them.

ratio = 1 − new/old over the linear layers inside the decoder blocks (embeddings and LM head
excluded). old = Σ m·n; new = Σ r·(m+n) (+ m for an added deviation bias) for compressed
layers and m·n for layers left dense. Rank 0 marks a dense layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

RATIO_DEFINITION = (
    "ratio = 1 - new/old over decoder-block linear weights only (embeddings and LM head excluded); "
    "old = sum m*n; new = sum r*(m+n) (+m for an added bias d) for compressed layers, m*n for dense ones"
)


def max_useful_rank(m: int, n: int, extra: int = 0) -> int:
    """The largest rank at which the factored layer is still smaller than the dense one."""
    return max((m * n - extra - 1) // (m + n), 0)


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """The baselines' rank rule: r = ⌊m·n·(1−ratio)/(m+n)⌋, at least 1."""
    return max(int(m * n * (1.0 - ratio) // (m + n)), 1)


def layer_params(m: int, n: int, rank: int, extra: int = 0) -> int:
    """Parameters a layer costs at `rank`; dense (m·n) when rank is 0 or would not shrink it."""
    if rank <= 0 or rank * (m + n) + extra >= m * n:
        return m * n
    return rank * (m + n) + extra


@dataclass
class LayerRank:
    name: str
    out_features: int
    in_features: int
    rank: int  # 0 = left dense

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def params(self, extra: int = 0) -> int:
        return layer_params(self.out_features, self.in_features, self.rank, extra)


def achieved_ratio(layers: list[LayerRank], extra_per_layer: bool = False) -> float:
    """Global ratio; `extra_per_layer` counts an added bias of m per compressed layer."""
    old = sum(layer.dense_params for layer in layers)
    new = sum(layer.params(layer.out_features if extra_per_layer else 0) for layer in layers)
    return 1.0 - new / old


def settle_rank(m: int, n: int, rank: int, extra: int = 0) -> int:
    """Keep the rank only where the factored layer is smaller; otherwise 0 (dense)."""
    return rank if 0 < rank and rank * (m + n) + extra < m * n else 0


def rank_table(layers: list[LayerRank], extra_per_layer: bool = False) -> list[dict]:
    rows = []
    for layer in layers:
        extra = layer.out_features if extra_per_layer else 0
        rows.append({**asdict(layer), "params": layer.params(extra), "dense_params": layer.dense_params,
                     "ratio": 1.0 - layer.params(extra) / layer.dense_params})
    return rows


def global_cut(importance: dict[str, "torch.Tensor"], shapes: dict[str, tuple[int, int]], budget: int,
               bias_per_layer: bool = True) -> dict[str, list[int]]:
    """Keep the most important components over all layers until the parameter budget is met.

    A component of an m×n layer costs m+n; a compressed layer also pays m for its bias d when
    `bias_per_layer`. Every layer keeps at least its best component, and never grows to a size
    that is not smaller than dense. Returns the kept component indices per layer.
    """
    import torch

    check_reachable(shapes, budget, bias_per_layer)
    extra = {name: (m if bias_per_layer else 0) for name, (m, n) in shapes.items()}
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


def check_reachable(shapes: dict[str, tuple[int, int]], budget: int, bias_per_layer: bool = True) -> None:
    """Fail clearly when even one component per layer (plus its bias) exceeds the budget."""
    from .errors import SocoError

    least = sum(m + n + (m if bias_per_layer else 0) for m, n in shapes.values())
    if least > budget:
        old = sum(m * n for m, n in shapes.values())
        raise SocoError(f"ratio {1 - budget / old:.3f} is out of reach: one component per layer already costs "
                        f"ratio {1 - least / old:.3f}; choose a ratio below that")
