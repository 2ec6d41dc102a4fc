"""Decompositions: each turns a weight W (m×n) into a `Decomposition` W = left·diag(sigma)·right, from which
factors A (r×n), B (m×r) with W ≈ B·A are read at any rank.

All work is in fp64. Every SVD-family method is "SVD of W in some basis, truncate, map back":
  plain       W = U Σ Vᵀ
  fisher      diag(f) W = U Σ Vᵀ, f = sqrt(row Fisher);  B = diag(1/f) U Σ½
  activation  W diag(s) = U Σ Vᵀ, s = mean|x|^α;         A = Σ½ Vᵀ diag(1/s)
  whitened    W L = U Σ Vᵀ, L Lᵀ = XᵀX;                 A = Σ½ Vᵀ L⁻¹
Which method uses which basis is the method's business (its config's `decompose`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import SocoError

log = logging.getLogger(__name__)


# How `Decomposition.factors` splits each component between A and B (see there). "balanced" follows issue 24's
# probe (SVD-LLM 0.4, 10 healing steps: 98.3 against 134.0 with "sqrt"); benchmarks/factor_split.py re-measures
# it. The two agree in the plain basis.
FACTOR_SPLITS = ("balanced", "sqrt")
FACTOR_SPLIT = "balanced"


@dataclass
class Decomposition:
    """A weight in a basis: W = left · diag(sigma) · right, components sorted by sigma."""

    left: torch.Tensor  # m×k
    sigma: torch.Tensor  # k
    right: torch.Tensor  # k×n

    def factors(self, rank: int, scores: torch.Tensor | None = None,
                split: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A, B keeping the first `rank` components, with σ·s folded in; B·A is the same for every `split`.

        "balanced" (default): each component's row of A and column of B get equal norms, √(|σs|·‖left‖·‖right‖)
        each. "sqrt": √|σs| on each side, as before issue 24; in a whitened basis `right` carries L⁻¹, so B's
        entries end up orders of magnitude above A's, which slows healing's shared learning rate and wastes
        per-channel quantization scales. In the plain basis (unit columns and rows) the two are the same."""
        s = self.sigma[:rank] if scores is None else self.sigma[:rank] * scores[:rank]
        right, left = self.right[:rank], self.left[:, :rank]
        sign = torch.sign(s) + (s == 0).to(s.dtype)
        split = split or FACTOR_SPLIT
        if split == "sqrt":
            root = s.abs().sqrt()
            return root[:, None] * right, left * (root * sign)[None, :]
        if split != "balanced":
            raise ValueError(f"unknown factor split {split!r} (known: {', '.join(FACTOR_SPLITS)})")
        r_norm, l_norm = right.norm(dim=1), left.norm(dim=0)
        ok = (r_norm > 0) & (l_norm > 0)
        # A row scale c with c·‖right‖ = |s|·‖left‖ / c; a zero-norm component keeps √|s| (it contributes 0 anyway)
        c = torch.where(ok, (s.abs() * l_norm / torch.where(ok, r_norm, 1)).sqrt(), s.abs().sqrt())
        b = torch.where(c > 0, s.abs() / torch.where(c > 0, c, 1), torch.zeros_like(c))
        return c[:, None] * right, left * (b * sign)[None, :]


def _svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(M, full_matrices=False)


def checked_fp64(W: torch.Tensor, name: str) -> torch.Tensor:
    W = W.double()
    if not torch.isfinite(W).all():
        raise SocoError(f"the weights of {name} contain NaN or inf; the checkpoint is corrupt, reload or re-download it")
    return W


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


def plain_basis(W: torch.Tensor, name: str) -> Decomposition:
    U, S, Vh = _svd(checked_fp64(W, name))
    return Decomposition(U, S, Vh)


def whitened_basis(W: torch.Tensor, xtx: torch.Tensor, name: str, jitter: float = 1e-6,
                   tries: int = 5) -> Decomposition:
    W = checked_fp64(W, name)
    L, L_inv = whitening(xtx.to(W.device), name, jitter, tries)
    U, S, Vh = _svd(W @ L)
    return Decomposition(U, S, Vh @ L_inv)


def activation_basis(W: torch.Tensor, abs_mean: torch.Tensor, alpha: float, name: str) -> Decomposition:
    W = checked_fp64(W, name)
    s = abs_mean.to(W.device).clamp_min(1e-6).pow(alpha)
    U, S, Vh = _svd(W * s[None, :])
    return Decomposition(U, S, Vh / s[None, :])


def fisher_basis(W: torch.Tensor, fisher_rows: torch.Tensor, name: str) -> Decomposition:
    W = checked_fp64(W, name)
    f = fisher_rows.to(W.device).sqrt()
    f = f.clamp_min(f.max() * 1e-6 if f.max() > 0 else 1.0)
    U, S, Vh = _svd(f[:, None] * W)
    return Decomposition(U / f[:, None], S, Vh)
