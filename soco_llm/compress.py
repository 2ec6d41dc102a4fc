"""`compress(model, config, calibration)`: the one in-place call that factorises a model.

validate → the handler registered for type(config) → report. It knows no method by name.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .core.adapter import find_targets
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
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    result = handler(model, config, targets, calibration, calibration_config or config.calibration())
    report = CompressionReport.of(config.method, config.ratio, result.rows, before, model,
                                  time.perf_counter() - start, result.config)
    report.tensors.update(result.tensors)
    log.info(report.summary())
    return report
