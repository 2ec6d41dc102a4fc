"""Each decomposition reproduces the layer at full rank; SVD-LLM beats plain SVD on calibration inputs."""

import pytest
import torch

from soco_llm import config_for
from soco_llm.core.decompose import whitening
from soco_llm.core.stats import LayerStats


def _stats(X: torch.Tensor, m: int) -> LayerStats:
    X = X.double()
    g = torch.Generator().manual_seed(1)
    return LayerStats(xtx=X.T @ X, abs_sum=X.abs().sum(0), rows=X.shape[0],
                      fisher_rows=torch.rand(m, generator=g, dtype=torch.float64) + 0.1)


def _data(m=24, n=16, rows=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    # Correlated, anisotropic inputs, as real activations are.
    X = torch.randn(rows, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    X[:, 0] *= 20
    return W, X


@pytest.mark.parametrize("method", ["svd", "fwsvd", "asvd", "svd-llm"])
def test_full_rank_reproduces_dense_layer(method):
    W, X = _data()
    spec = config_for(method, ratio=0.5).decompose(W, _stats(X, W.shape[0]), "layer")
    A, B = spec.factors(min(W.shape))
    assert A.shape == (16, 16) and B.shape == (24, 16)
    torch.testing.assert_close(X @ (B @ A).T, X @ W.T, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("rank", [2, 4, 8, 12])
def test_svd_llm_output_error_below_plain_svd(rank):
    W, X = _data()
    stats = _stats(X, W.shape[0])
    errs = {}
    for method in ("svd", "svd-llm"):
        A, B = config_for(method, ratio=0.5).decompose(W, stats, "layer").factors(rank)
        errs[method] = torch.linalg.norm(X @ W.T - X @ (B @ A).T)
    assert errs["svd-llm"] < errs["svd"]


def test_whitening_falls_back_with_warning_when_not_positive_definite(caplog):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 8, generator=g, dtype=torch.float64)  # rank 3 < 8: XᵀX is singular
    xtx = X.T @ X
    xtx[0, 0] -= 1.0  # and indefinite
    L, L_inv = whitening(xtx, "blocks.0.q_proj", jitter=1e-9, tries=1)
    assert "blocks.0.q_proj" in caplog.text
    torch.testing.assert_close(L @ L_inv, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)


def test_scores_fold_into_factors():
    W, _ = _data()
    spec = config_for("svd", ratio=0.5).decompose(W, None, "layer")
    s = torch.linspace(0.5, 2.0, 16, dtype=torch.float64)
    A, B = spec.factors(16, s)
    torch.testing.assert_close(B @ A, spec.left @ torch.diag(spec.sigma * s) @ spec.right)
