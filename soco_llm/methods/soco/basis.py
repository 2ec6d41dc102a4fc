"""SoCo's basis: every target decomposed once (whitened or plain), capped at the largest useful rank,
with the prior that puts the uniform cut at importance 1; and its flat form for the run folder.

With `sequential`, each block's whitening statistics come from the inputs of the earlier blocks cut at
the uniform rank (as SVD-LLM's sequential mode does), a stand-in for the cut SoCo has not learned yet;
the dense layers are put back before training."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.adapter import Target, linear_weight, replace_module
from ...core.layer import LowRankLinear
from ...core.bases import plain_basis, whitened_basis
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


def basis_entry(target: Target, cfg: SoCoConfig, stats: LayerStats | None) -> dict[str, torch.Tensor]:
    """One target's basis (left, sigma, right, prior, bias), capped at the largest useful rank."""
    m, n = target.shape
    w = linear_weight(target.module).detach()
    spec = whitened_basis(w, stats.xtx, target.name) if cfg.basis == "whitened" else plain_basis(w, target.name)
    k = max(max_useful_rank(m, n, cfg.deviation), 1) if cfg.cap_basis else spec.sigma.numel()
    entry = {"left": spec.left[:, :k].to(w.dtype).contiguous(), "sigma": spec.sigma[:k].to(w.dtype),
             "right": spec.right[:k].to(w.dtype).contiguous(),
             "prior": prior(spec.sigma[:k], uniform_rank(m, n, cfg.ratio))}
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


def flatten(basis: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{name}::{k}": v for name, entry in basis.items() for k, v in entry.items()}


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        name, k = key.split("::")
        out.setdefault(name, {})[k] = v
    return out
