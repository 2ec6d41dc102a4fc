"""The vectorised global cut keeps exactly the components the original greedy loop kept."""

import sys
from pathlib import Path

import pytest
import torch

from soco_llm.core.budget import global_cut, max_useful_rank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness.reference_cut import kept_indices, reference_cut  # noqa: E402  the original loop, the benchmark's baseline


def _random_case(g, capped: bool, scale: float):
    shapes, importance = {}, {}
    for i in range(int(torch.randint(1, 14, (1,), generator=g))):
        m, n = (int(v) for v in torch.randint(2, 48, (2,), generator=g))
        shapes[f"layer{i}"] = (m, n)
        k = max(max_useful_rank(m, n, True), 1) if capped else min(m, n)
        # log-normal spread, as learned importances are; `scale` packs many values into few bins
        importance[f"layer{i}"] = torch.exp(scale * torch.randn(k, generator=g, dtype=torch.float64)).float()
    return shapes, importance


@pytest.mark.parametrize("capped", [True, False])
@pytest.mark.parametrize("deviation", [True, False])
@pytest.mark.parametrize("scale", [2.0, 0.001])
def test_vectorised_cut_equals_the_loop(capped, deviation, scale):
    g = torch.Generator().manual_seed(hash((capped, deviation, scale)) % 2**31)
    compared = 0
    for _ in range(60):
        shapes, importance = _random_case(g, capped, scale)
        old = sum(m * n for m, n in shapes.values())
        least = sum(m + n + (m if deviation else 0) for m, n in shapes.values())
        for keep in (0.05, 0.3, 0.6, 0.9, 1.0):
            budget = int(keep * old)
            if budget < least:
                continue
            masks = global_cut(importance, shapes, budget, deviation)
            assert kept_indices(masks) == reference_cut(importance, shapes, budget, deviation)
            used = sum((m + n) * int(masks[k].sum()) + (m if deviation else 0) for k, (m, n) in shapes.items())
            assert used <= budget
            compared += 1
    assert compared > 100


def test_cut_masks_stay_on_the_importances_device_and_shape():
    shapes = {"a": (8, 6), "b": (5, 9)}
    importance = {"a": torch.rand(3, dtype=torch.float64), "b": torch.rand(3)}
    masks = global_cut(importance, shapes, 40)
    assert all(m.dtype == torch.bool and m.shape == importance[k].shape for k, m in masks.items())


@pytest.mark.parametrize("capped", [True, False])
def test_ties_keep_the_budget_and_the_caps(capped):
    g = torch.Generator().manual_seed(7)
    for _ in range(40):
        shapes, importance = _random_case(g, capped, 1.0)
        importance = {k: torch.randint(0, 3, v.shape, generator=g).float() for k, v in importance.items()}
        old = sum(m * n for m, n in shapes.values())
        least = sum(2 * m + n for m, n in shapes.values())
        budget = max(int(0.5 * old), least)
        masks = global_cut(importance, shapes, budget, deviation=True)
        used = sum((m + n) * int(masks[k].sum()) + m for k, (m, n) in shapes.items())
        assert used <= budget
        for k, (m, n) in shapes.items():
            assert 1 <= int(masks[k].sum()) <= max(max_useful_rank(m, n, True), 1)
            assert masks[k][int(torch.argmax(importance[k]))]  # the layer's best (first of equals) is kept


def reference_grouped_cut(importance, shapes, budget, deviation, q):
    """The grouped greedy spelled out: each layer's components best first in groups of q, ranked by mean."""
    items, kept, used = [], {}, 0
    for li, (name, (m, n)) in enumerate(shapes.items()):
        order = torch.argsort(importance[name], descending=True, stable=True).tolist()
        groups = [order[i:i + q] for i in range(0, len(order), q)]
        kept[name] = list(groups[0])
        used += len(groups[0]) * (m + n) + (m if deviation else 0)
        cap = max_useful_rank(m, n, deviation) // q
        for gi, g in enumerate(groups[1:], start=1):
            if len(g) == q and gi < cap:
                items.append((float(importance[name][g].mean()), li, gi, name, g, q * (m + n)))
    for *_, name, g, cost in sorted(items, key=lambda t: (-t[0], t[1], t[2])):
        if used + cost <= budget:
            kept[name] += g
            used += cost
    return {name: sorted(k) for name, k in kept.items()}


@pytest.mark.parametrize("q", [2, 4, 8])
def test_rank_multiples_keep_whole_groups_within_the_budget(q):
    g = torch.Generator().manual_seed(q)
    compared = 0
    for _ in range(40):
        shapes, importance = _random_case(g, True, 2.0)
        old = sum(m * n for m, n in shapes.values())
        least = sum(q * (m + n) + m for m, n in shapes.values())
        for keep in (0.3, 0.6, 0.9):
            budget = int(keep * old)
            if budget < least:
                continue
            masks = global_cut(importance, shapes, budget, True, multiple=q)
            assert kept_indices(masks) == reference_grouped_cut(importance, shapes, budget, True, q)
            for k, (m, n) in shapes.items():
                kept = int(masks[k].sum())
                assert kept % q == 0 or kept == importance[k].numel() < q
            compared += 1
    assert compared > 20
