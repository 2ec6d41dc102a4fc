"""`compress(model, config, calibration)`: the one in-place call that factorises a model.

validate → the handler registered for type(config) → report. It knows no method by name.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .core.adapter import Target, find_targets
from .core.budget import budget_params, check_reachable
from .core.report import CompressionReport, model_params
from .errors import SocoError
from .methods.base import CalibrationConfig, CompressionConfig, handler_for

log = logging.getLogger(__name__)


def compress(model: nn.Module, config: CompressionConfig, calibration: torch.Tensor | None = None,
             calibration_config: CalibrationConfig | None = None) -> CompressionReport:
    """Compress `model` in place. `calibration`: LongTensor [samples, seq_len] of token ids.

    Data-free methods (svd) ignore `calibration`; the others require it.
    """
    config.validate()
    handler = handler_for(config)
    if config.needs and calibration is None:
        raise SocoError(f"method {config.method!r} needs calibration token windows")
    start = time.perf_counter()
    before = model_params(model)
    targets = check_target(model, config)
    result = handler(model, config, targets, calibration, calibration_config or config.calibration())
    report = CompressionReport.of(config.method, config.ratio, result.rows, before, model,
                                  time.perf_counter() - start, result.config)
    report.tensors.update(result.tensors)
    log.info(report.summary())
    return report


def check_target(model: nn.Module, config: CompressionConfig) -> list[Target]:
    """The layers `config` compresses in `model`, once it is sure that its ratio can be met: a ratio that one
    component per layer (`rank_multiple` of them, plus an added bias) already misses is an error before any
    work, never a smaller ratio saved in silence."""
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    shapes = {t.name: t.shape for t in targets}
    check_reachable(shapes, budget_params(sum(m * n for m, n in shapes.values()), config.ratio), config.adds_bias,
                    config.rank_multiple)
    return targets


def compressed_bytes(model: nn.Module, targets: list[Target], ratio: float) -> int:
    """About the bytes `model` takes once its `targets` are compressed at `ratio`: what saving it will write."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    target = sum(t.module.weight.numel() * t.module.weight.element_size() for t in targets)
    return int(total - ratio * target)
