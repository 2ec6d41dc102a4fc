"""The vectorised global cut keeps exactly the components the original greedy loop kept."""

import sys
from pathlib import Path

import pytest
import torch

from soco_llm.core.budget import global_cut, kept_indices, max_useful_rank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness.reference_cut import reference_cut  # noqa: E402  the original loop, the benchmark's baseline


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
@pytest.mark.parametrize("added_bias", [True, False])
@pytest.mark.parametrize("scale", [2.0, 0.001])
def test_vectorised_cut_equals_the_loop(capped, added_bias, scale):
    g = torch.Generator().manual_seed(hash((capped, added_bias, scale)) % 2**31)
    compared = 0
    for _ in range(60):
        shapes, importance = _random_case(g, capped, scale)
        old = sum(m * n for m, n in shapes.values())
        least = sum(m + n + (m if added_bias else 0) for m, n in shapes.values())
        for keep in (0.05, 0.3, 0.6, 0.9, 1.0):
            budget = int(keep * old)
            if budget < least:
                continue
            masks = global_cut(importance, shapes, budget, added_bias)
            assert kept_indices(masks) == reference_cut(importance, shapes, budget, added_bias)
            used = sum((m + n) * int(masks[k].sum()) + (m if added_bias else 0) for k, (m, n) in shapes.items())
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
        masks = global_cut(importance, shapes, budget, added_bias=True)
        used = sum((m + n) * int(masks[k].sum()) + m for k, (m, n) in shapes.items())
        assert used <= budget
        for k, (m, n) in shapes.items():
            assert 1 <= int(masks[k].sum()) <= max(max_useful_rank(m, n, True), 1)
            assert masks[k][int(torch.argmax(importance[k]))]  # the layer's best (first of equals) is kept
