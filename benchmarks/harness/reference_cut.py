"""The global cut as first written (session 1): a greedy Python loop over every component.

Kept as the baseline that `benchmarks/cut_speed.py` times the vectorised `soco_llm.core.budget.global_cut`
against, and as the reference that tests/test_global_cut.py checks it keeps exactly the same components as.
"""

from __future__ import annotations

import torch

from soco_llm.core.budget import check_reachable


def reference_cut(importance: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int,
                  deviation: bool) -> dict[str, list[int]]:
    """Kept component indices per layer, ascending."""
    check_reachable(shapes, budget, deviation)
    extra = {name: (m if deviation else 0) for name, (m, n) in shapes.items()}
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
    return {name: sorted(k) for name, k in kept.items()}


def kept_indices(masks: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """The kept component indices of each layer, ascending: the global cut's masks in the reference's form."""
    return {name: torch.nonzero(m).squeeze(1).tolist() for name, m in masks.items()}
