"""SVD, FWSVD, ASVD and SVD-LLM: one handler, four bases.

Each config says which statistics it needs and how it decomposes a weight (`decompose`); the
handler collects those statistics one decoder block at a time, decomposes every target in its
method's basis and truncates it at the uniform rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checks import Rule, between
from ..core.adapter import Target, linear_weight, replace_module
from ..core.decompose import Decomposition, activation_basis, fisher_basis, plain_basis, whitened_basis
from ..core.budget import LayerRank, settle_rank, uniform_rank
from ..core.layer import LowRankLinear
from ..core.stats import ACTIVATION_KINDS, BlockRunner, LayerStats, collect_fisher
from ..errors import SocoError
from .base import CalibrationConfig, CompressionConfig, MethodResult, register


@dataclass
class SVDConfig(CompressionConfig):
    """Truncated SVD of W at the uniform rank."""

    method: ClassVar[str] = "svd"

    def decompose(self, W: torch.Tensor, stats: LayerStats, name: str) -> Decomposition:
        return plain_basis(W, name)


@dataclass
class FWSVDConfig(CompressionConfig):
    """Fisher-weighted SVD: rows weighted by summed squared LM-loss gradients."""

    method: ClassVar[str] = "fwsvd"

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"fisher"}

    def decompose(self, W: torch.Tensor, stats: LayerStats, name: str) -> Decomposition:
        return fisher_basis(W, stats.fisher_rows, name)


@dataclass
class ASVDConfig(CompressionConfig):
    """Activation-aware SVD: input channels scaled by (mean |x|)^alpha."""

    method: ClassVar[str] = "asvd"
    # The paper's range; 0 is plain SVD, and much past 1 the scaling overflows on outlier channels.
    rules: ClassVar[dict[str, Rule]] = {"alpha": between(0, 1, note="the activation exponent (0: plain SVD)")}
    cli_options: ClassVar[dict[str, str]] = {"alpha": "ASVD activation exponent, in [0, 1] (default 0.5)"}
    alpha: float = 0.5

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"abs_mean"}

    def decompose(self, W: torch.Tensor, stats: LayerStats, name: str) -> Decomposition:
        return activation_basis(W, stats.abs_mean, self.alpha, name)


@dataclass
class SVDLLMConfig(CompressionConfig):
    """Truncation-aware whitening (SVD-LLM): SVD of W·L with L Lᵀ = XᵀX."""

    method: ClassVar[str] = "svd-llm"
    # Relative jitter added to XᵀX's diagonal when Cholesky fails; grows 10x per retry.
    jitter: float = 1e-6
    max_jitter_tries: int = 5
    # Beyond 20 tries the jitter (×10 each) outgrows any XᵀX: eigh is the fallback then anyway.
    rules: ClassVar[dict[str, Rule]] = {"jitter": between(0, 1, low_open=True, note="relative to XᵀX's mean diagonal"),
                                        "max_jitter_tries": between(0, 20)}

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | {"xtx"}

    def decompose(self, W: torch.Tensor, stats: LayerStats, name: str) -> Decomposition:
        return whitened_basis(W, stats.xtx, name, self.jitter, self.max_jitter_tries)


SVD_FAMILY = (SVDConfig, FWSVDConfig, ASVDConfig, SVDLLMConfig)


def compress_uniform(model: nn.Module, config: CompressionConfig, targets: list[Target],
                     calibration: torch.Tensor | None, calibration_config: CalibrationConfig) -> MethodResult:
    """Decompose every target in the config's basis and keep the uniform rank."""
    needs = config.needs
    batches = list(calibration.split(calibration_config.batch_size)) if calibration is not None else []
    ranks: dict[str, int] = {}
    by_name = {t.name: t for t in targets}
    fisher = collect_fisher(model, targets, batches) if "fisher" in needs else {}

    def factorize(target: Target, stats: LayerStats) -> None:
        stats.fisher_rows = fisher.get(target.name, stats.fisher_rows)
        ranks[target.name] = _factorize(model, config, target, stats)

    activation_kinds = set(needs & ACTIVATION_KINDS)
    if activation_kinds or config.sequential:
        was_training = model.training
        model.eval()
        BlockRunner(model, targets, batches).run(
            lambda _i, _block, stats: [factorize(by_name[n], s) for n, s in stats.items()],
            activation_kinds, config.sequential, desc=f"{config.method} blocks")
        model.train(was_training)
    else:
        for t in tqdm(targets, desc=f"{config.method} layers"):
            factorize(t, LayerStats())
    return MethodResult([LayerRank(t.name, *t.shape, ranks[t.name]) for t in targets], config.to_dict())


@torch.no_grad()
def _factorize(model: nn.Module, config: CompressionConfig, target: Target, stats: LayerStats) -> int:
    m, n = target.shape
    rank = settle_rank(m, n, uniform_rank(m, n, config.ratio, config.rank_multiple))
    if rank == 0:
        return 0  # a factored layer would not be smaller: stays dense
    if not hasattr(config, "decompose"):
        raise SocoError(f"method {config.method!r} has no decomposition")
    A, B = config.decompose(linear_weight(target.module).detach(), stats, target.name).factors(rank)
    replace_module(model, target.name, LowRankLinear.replacing(target.module, A, B))
    return rank


for _cls in SVD_FAMILY:
    register(_cls, compress_uniform)
