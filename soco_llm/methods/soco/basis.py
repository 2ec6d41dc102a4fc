"""SoCo's basis: every target decomposed once (whitened or plain), capped at the largest useful rank,
with the prior that puts the uniform cut at importance 1; and its flat form for the run folder.

With `sequential`, each block's whitening statistics come from the inputs of the earlier blocks cut at
the uniform rank (as SVD-LLM's sequential mode does), a stand-in for the cut SoCo has not learned yet;
the dense layers are put back before training."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.adapter import Target, linear_weight, replace_module
from ...core.layer import LowRankLinear
from ...core.decompose import plain_basis, whitened_basis
from ...core.budget import max_useful_rank, uniform_rank
from ...core.stats import BlockRunner, LayerStats
from ...errors import SocoError
from .config import SoCoConfig


def prior(sigma: torch.Tensor, r: int) -> torch.Tensor:
    """σ relative to the uniform cut: the components a uniform rank-r cut keeps get importance > 1."""
    k = sigma.numel()
    lo, hi = sigma[min(r, k) - 1], sigma[min(r, k - 1)]
    edge = torch.sqrt(lo.clamp_min(1e-30) * hi.clamp_min(1e-30)) if r < k else lo * 0.5
    return (sigma / edge.clamp_min(1e-30)).float()


def half_precision_scale(rows: int) -> float:
    """The power of two nearest √rows. The whitened basis is of Σ xᵀx over `rows` tokens, so its σ grow and
    its A₀ shrink with √rows (σ past 2e5 on the default model: inf in fp16); divided and multiplied by this,
    A₀x has unit variance over the calibration text and σ the scale of the layer's output. A power of two
    makes the rescaling exact in every float format (the same bits as unscaled, where those were finite)."""
    return 2.0 ** round(math.log2(max(rows, 1)) / 2)


def basis_entry(target: Target, cfg: SoCoConfig, stats: LayerStats | None) -> dict[str, torch.Tensor]:
    """One target's basis (left, sigma, right, prior, scale, bias), capped at the largest useful rank.

    `sigma` and `right` are stored divided and multiplied by `scale` (`half_precision_scale`), the true
    decomposition being left · diag(sigma · scale) · right / scale."""
    m, n = target.shape
    w = linear_weight(target.module).detach()
    whitened = cfg.basis == "whitened"
    spec = whitened_basis(w, stats.xtx, target.name) if whitened else plain_basis(w, target.name)
    k = max(max_useful_rank(m, n, cfg.deviation), 1) if cfg.cap_basis else spec.sigma.numel()
    scale = half_precision_scale(stats.rows) if whitened else 1.0
    entry = {"left": spec.left[:, :k].to(w.dtype).contiguous(), "sigma": (spec.sigma[:k] / scale).to(w.dtype),
             "right": (spec.right[:k] * scale).to(w.dtype).contiguous(),
             "prior": prior(spec.sigma[:k], uniform_rank(m, n, cfg.ratio)),
             "scale": torch.tensor(scale, dtype=torch.float64, device=w.device)}
    if getattr(target.module, "bias", None) is not None:
        entry["bias"] = target.module.bias.detach().clone()
    return entry


def decompose_targets(model: nn.Module, cfg: SoCoConfig, targets: list[Target],
                      windows: torch.Tensor | None) -> dict[str, dict[str, torch.Tensor]]:
    """The basis of every target, computed one block at a time."""
    by_name = {t.name: t for t in targets}
    if cfg.basis == "plain":
        return {t.name: basis_entry(t, cfg, None) for t in tqdm(targets, desc="soco basis")}
    if windows is None:
        raise SocoError("the whitened basis needs calibration windows")
    basis: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.nn.Module] = {}  # what `sequential` swapped out, put back at the end
    batches = list(windows[: cfg.whiten_samples].split(cfg.batch_size))

    def on_block(i: int, block: nn.Module, stats: dict) -> None:
        entries = {n: basis_entry(by_name[n], cfg, s) for n, s in stats.items()}
        basis.update(entries)
        for n, e in entries.items() if cfg.sequential else ():
            t = by_name[n]
            r = min(uniform_rank(*t.shape, cfg.ratio), e["sigma"].numel())
            dense[n] = t.module
            replace_module(model, n, LowRankLinear.replacing(t.module, e["sigma"][:r, None] * e["right"][:r],
                                                             e["left"][:, :r]))

    try:
        BlockRunner(model, targets, batches).run(on_block, {"xtx"}, sequential=cfg.sequential, desc="soco basis")
    finally:
        for n, module in dense.items():
            replace_module(model, n, module)
    return basis
