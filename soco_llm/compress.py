"""`compress(model, config, calibration)`: the one in-place call that factorises a model."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapter import Target, find_targets, linear_weight, replace_module
from .config import CalibrationConfig, CompressionConfig
from .decompose import spectrum
from .errors import SocoError
from .layer import LowRankLinear
from .ranks import RATIO_DEFINITION, LayerRank, achieved_ratio, rank_table, settle_rank, uniform_rank
from .stats import BlockRunner, LayerStats, collect_fisher

log = logging.getLogger(__name__)


def model_params(model: nn.Module) -> int:
    """Unique parameters of the whole model (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass
class CompressionReport:
    method: str
    target_ratio: float
    achieved_ratio: float
    layers: list[dict]
    model_params_before: int
    model_params_after: int
    seconds: float
    config: dict = field(default_factory=dict)
    ratio_definition: str = RATIO_DEFINITION
    # Tensors to save beside the model, e.g. SoCo's trained scores; not part of to_dict().
    tensors: dict = field(default_factory=dict, repr=False)

    @property
    def ranks(self) -> dict[str, int]:
        return {row["name"]: row["rank"] for row in self.layers}

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "tensors"}

    def summary(self) -> str:
        dense = sum(1 for r in self.layers if r["rank"] == 0)
        return (f"{self.method}: target ratio {self.target_ratio:.3f}, achieved {self.achieved_ratio:.4f} "
                f"over {len(self.layers)} decoder linears ({dense} left dense); whole model "
                f"{self.model_params_before / 1e6:.2f}M -> {self.model_params_after / 1e6:.2f}M params")


def swap_in_lowrank(model: nn.Module, name: str, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
                    dense_cls: type[nn.Module]) -> LowRankLinear:
    """Put a LowRankLinear with factors A, B (and bias) where module `name` was."""
    layer = LowRankLinear.from_factors(A, B, bias)
    layer.dense_cls = dense_cls
    replace_module(model, name, layer)
    return layer


def install_factors(model: nn.Module, target: Target, A: torch.Tensor, B: torch.Tensor) -> LowRankLinear:
    """Replace `target` by a LowRankLinear holding A, B and the original bias."""
    old = target.module
    w = linear_weight(old)
    bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
    layer = swap_in_lowrank(model, target.name, A.to(w.device, w.dtype), B.to(w.device, w.dtype), bias, type(old))
    layer.requires_grad_(w.requires_grad)
    return layer


# Methods that are not "decompose each layer at the uniform rank" register their own routine.
COMPRESSORS: dict[str, Callable] = {}


def calibration_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(windows.split(batch_size))


def compress(model: nn.Module, config: CompressionConfig, calibration: torch.Tensor | None = None,
             calibration_config: CalibrationConfig | None = None) -> CompressionReport:
    """Compress `model` in place. `calibration`: LongTensor [samples, seq_len] of token ids.

    Data-free methods (svd) ignore `calibration`; the others require it.
    """
    config.validate()
    if config.method in COMPRESSORS:
        return COMPRESSORS[config.method](model, config, calibration, calibration_config)
    start = time.perf_counter()
    before = model_params(model)
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    needs = set(config.needs)
    if (needs or config.sequential) and calibration is None:
        raise SocoError(f"method {config.method!r} needs calibration token windows")
    batch_size = calibration_config.batch_size if calibration_config else 8
    batches = calibration_batches(calibration, batch_size) if calibration is not None else []
    ranks: dict[str, int] = {}
    by_name = {t.name: t for t in targets}

    fisher = collect_fisher(model, targets, batches) if "fisher" in needs else {}

    def compress_block(_i: int, _block: nn.Module, stats: dict[str, LayerStats]) -> None:
        for name, s in stats.items():
            if name in fisher:
                s.fisher_rows = fisher[name]
            ranks[name] = _factorize(model, config, by_name[name], s)

    activation_kinds = needs & {"xtx", "abs_mean"}
    if activation_kinds or config.sequential:
        was_training = model.training
        model.eval()
        BlockRunner(model, targets, batches).run(compress_block, activation_kinds, config.sequential,
                                                 desc=f"{config.method} blocks")
        model.train(was_training)
    else:
        for t in tqdm(targets, desc=f"{config.method} layers"):
            s = LayerStats(fisher_rows=fisher.get(t.name))
            ranks[t.name] = _factorize(model, config, t, s)

    layers = [LayerRank(t.name, *t.shape, ranks[t.name]) for t in targets]
    report = CompressionReport(
        method=config.method, target_ratio=config.ratio, achieved_ratio=achieved_ratio(layers),
        layers=rank_table(layers), model_params_before=before, model_params_after=model_params(model),
        seconds=time.perf_counter() - start, config=config.to_dict(),
    )
    log.info(report.summary())
    return report


@torch.no_grad()
def _factorize(model: nn.Module, config: CompressionConfig, target: Target, stats: LayerStats) -> int:
    m, n = target.shape
    rank = settle_rank(m, n, uniform_rank(m, n, config.ratio))
    if rank == 0:
        return 0  # a factored layer would not be smaller: stays dense
    spec = spectrum(config, linear_weight(target.module).detach(), stats, target.name)
    A, B = spec.factors(rank)
    install_factors(model, target, A, B)
    return rank
