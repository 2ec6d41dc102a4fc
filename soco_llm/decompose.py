"""Decompositions: each turns a weight W (m×n) into factors A (r×n), B (m×r) with W ≈ B·A.

All work is in fp64. Every method is "SVD of W in some basis, truncate, map back":
  svd      W = U Σ Vᵀ
  fwsvd    diag(f) W = U Σ Vᵀ, f = sqrt(row Fisher);  B = diag(1/f) U Σ½
  asvd     W diag(s) = U Σ Vᵀ, s = mean|x|^α;         A = Σ½ Vᵀ diag(1/s)
  svd-llm  W L = U Σ Vᵀ, L Lᵀ = XᵀX;                 A = Σ½ Vᵀ L⁻¹
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import ASVDConfig, CompressionConfig, FWSVDConfig, SVDConfig, SVDLLMConfig
from .errors import SocoError
from .stats import LayerStats

log = logging.getLogger(__name__)


@dataclass
class Spectrum:
    """A weight in a basis: W = left · diag(sigma) · right, components sorted by sigma."""

    left: torch.Tensor  # m×k
    sigma: torch.Tensor  # k
    right: torch.Tensor  # k×n

    def factors(self, rank: int, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A, B keeping the first `rank` components; √(σ·s) is folded into both factors."""
        s = self.sigma[:rank] if scores is None else self.sigma[:rank] * scores[:rank]
        root = s.abs().sqrt()
        sign = torch.sign(s) + (s == 0).to(s.dtype)
        return root[:, None] * self.right[:rank], self.left[:, :rank] * (root * sign)[None, :]


def _svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(M, full_matrices=False)


def whitening(xtx: torch.Tensor, name: str, jitter: float = 1e-6, tries: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """L and L⁻¹ with L Lᵀ = XᵀX. Cholesky, then growing diagonal jitter, then eigh."""
    if not torch.isfinite(xtx).all():
        raise SocoError(f"NaN or inf in the calibration statistics of {name}; re-run with --dtype float32")
    n = xtx.shape[0]
    eye = torch.eye(n, dtype=xtx.dtype, device=xtx.device)
    scale = xtx.diagonal().mean().clamp_min(1e-12)
    for k in range(tries + 1):
        damp = 0.0 if k == 0 else jitter * 10 ** (k - 1) * scale
        L, info = torch.linalg.cholesky_ex(xtx + damp * eye)
        if info == 0:
            if k > 0:
                log.warning("%s: XᵀX not positive definite; Cholesky succeeded with jitter %.2e", name, float(damp))
            return L, torch.linalg.solve_triangular(L, eye, upper=False)
    log.warning("%s: Cholesky failed even with jitter; falling back to eigh", name)
    evals, Q = torch.linalg.eigh(xtx)
    root = evals.clamp_min(scale * 1e-10).sqrt()
    return Q * root[None, :], (Q / root[None, :]).T


def spectrum(cfg: CompressionConfig, W: torch.Tensor, stats: LayerStats | None, name: str) -> Spectrum:
    """The method's basis for W (m×n, fp64)."""
    W = W.double()
    if not torch.isfinite(W).all():
        raise SocoError(f"the weights of {name} contain NaN or inf; the checkpoint is corrupt, reload or re-download it")
    if isinstance(cfg, SVDLLMConfig):
        L, L_inv = whitening(stats.xtx.to(W.device), name, cfg.jitter, cfg.max_jitter_tries)
        U, S, Vh = _svd(W @ L)
        return Spectrum(U, S, Vh @ L_inv)
    if isinstance(cfg, ASVDConfig):
        s = stats.abs_mean.to(W.device).clamp_min(1e-6).pow(cfg.alpha)
        U, S, Vh = _svd(W * s[None, :])
        return Spectrum(U, S, Vh / s[None, :])
    if isinstance(cfg, FWSVDConfig):
        f = stats.fisher_rows.to(W.device).sqrt()
        f = f.clamp_min(f.max() * 1e-6 if f.max() > 0 else 1.0)
        U, S, Vh = _svd(f[:, None] * W)
        return Spectrum(U / f[:, None], S, Vh)
    if isinstance(cfg, SVDConfig) or cfg.method == "svd":
        U, S, Vh = _svd(W)
        return Spectrum(U, S, Vh)
    raise SocoError(f"method {cfg.method!r} has no decomposition here")
