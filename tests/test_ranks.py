"""Ratio accounting exactly as METHOD.md defines it."""

import pytest

from soco_llm import HealConfig, compress, config_for
from soco_llm.core.budget import LayerRank, achieved_ratio, layer_params, max_useful_rank, settle_rank, uniform_rank
from tiny import random_windows, tiny_model


def test_uniform_rank_rule():
    assert uniform_rank(576, 1536, 0.4) == (576 * 1536 * 6 // 10) // (576 + 1536)
    assert uniform_rank(4096, 4096, 0.2) == 1638


def test_layer_that_would_not_shrink_stays_dense():
    m, n = 10, 10  # max useful rank: 10*10 / 20 -> 4 (rank 5 costs exactly m*n)
    assert max_useful_rank(m, n) == 4
    assert settle_rank(m, n, 5) == 0 and settle_rank(m, n, 4) == 4
    assert layer_params(m, n, 5) == 100 and layer_params(m, n, 4) == 80
    assert layer_params(m, n, 0) == 100


def test_achieved_ratio_by_hand():
    layers = [LayerRank("a", 100, 50, 10), LayerRank("b", 40, 40, 0), LayerRank("c", 30, 60, 5)]
    old = 100 * 50 + 40 * 40 + 30 * 60
    new = 10 * 150 + 40 * 40 + 5 * 90
    assert achieved_ratio(layers) == pytest.approx(1 - new / old, abs=1e-15)
    new_d = new + 100 + 30  # a deviation d costs m per compressed layer
    with_d = [LayerRank(x.name, x.out_features, x.in_features, x.rank, deviation=True) for x in layers]
    assert achieved_ratio(with_d) == pytest.approx(1 - new_d / old, abs=1e-15)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_report_matches_model_parameters(ratio):
    model = tiny_model("llama")
    dense = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight"))
    report = compress(model, config_for("svd", ratio=ratio))
    factored = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and n.endswith((".A.weight", ".B.weight", "proj.weight")))
    assert report.achieved_ratio == pytest.approx(1 - factored / dense, abs=1e-12)
    # The uniform rule never removes less than asked, and rounds away at most one rank per layer.
    assert report.achieved_ratio >= ratio
    slack = sum((r["out_features"] + r["in_features"]) for r in report.layers) / dense
    assert report.achieved_ratio - ratio <= slack
    assert sum(r["params"] for r in report.layers) == factored
    assert report.model_params_before - report.model_params_after == dense - factored


def test_uniform_rank_rounds_down_to_a_multiple_and_never_exceeds_the_share():
    assert uniform_rank(4096, 4096, 0.4) == 1228 and uniform_rank(4096, 4096, 0.4, 8) == 1224
    assert uniform_rank(4096, 4096, 0.4, 64) == 1216
    assert uniform_rank(10, 10, 0.5, 8) == 2  # below one multiple: the plain rule
    for m, n, ratio, q in [(576, 1536, 0.4, 8), (192, 576, 0.2, 16), (1536, 576, 0.6, 64)]:
        r = uniform_rank(m, n, ratio, q)
        assert r % q == 0 and r * (m + n) <= m * n * (1 - ratio)


@pytest.mark.parametrize("method", ["svd-llm", "soco"])
def test_rank_multiple_rounds_every_rank_and_keeps_the_budget(method):
    q = 8
    settings = dict(steps=4, batch_size=4, rank_multiple=q) if method == "soco" else dict(rank_multiple=q)
    model = tiny_model("llama")
    report = compress(model, config_for(method, ratio=0.4, **settings), random_windows(8, 32), heal_config=HealConfig())
    ranks = [r["rank"] for r in report.layers if r["rank"]]
    assert ranks and all(r % q == 0 for r in ranks)
    assert report.achieved_ratio >= 0.4  # rounding never spends more than the budget
    assert report.achieved_ratio == pytest.approx(1 - sum(r["params"] for r in report.layers)
                                                  / sum(r["dense_params"] for r in report.layers))
