"""`compress(model, config, calibration)`: the one in-place call that runs a method's recipe on a model.

The recipe is the config's: validate → the handler registered for type(config) (which cuts) → healing, with
the config's `heal_defaults()` unless `heal` is given. The CLI runs this same call, so `soco compress
--method M` and `compress(model, MConfig())` give the same model. It knows no method by name.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from .core.adapter import Target, find_targets
from .core.budget import budget_params, check_reachable
from .core.report import CompressionReport, model_params
from .core.teacher import teacher_cache
from .errors import SocoError
from .heal import HealConfig, heal_report
from .methods.base import CalibrationConfig, CompressionConfig, handler_for

log = logging.getLogger(__name__)


def compress(model: nn.Module, config: CompressionConfig, calibration: torch.Tensor | None = None,
             calibration_config: CalibrationConfig | None = None, heal_config: HealConfig | None = None,
             heal_windows: torch.Tensor | None = None,
             on_cut: Callable[[nn.Module, CompressionReport], None] | None = None) -> CompressionReport:
    """Compress `model` in place. `calibration`: LongTensor [samples, seq_len] of token ids.

    Data-free methods (svd) ignore `calibration`; the others require it.
    `heal_config`: healing after the cut; None = the recipe's (`config.heal_defaults()`: SoCo heals a whole-model
    run, the other methods do not); `HealConfig()` = no healing. Healing trains on `heal_windows` against the
    dense model's teacher on them, cached before the cut; without `heal_windows`, on the teacher and windows the
    method trained against (`MethodResult.teacher`), else on `calibration`.
    `on_cut(model, report)`: called between the cut and healing (the CLI measures the unhealed model there).
    """
    config.validate()
    handler = handler_for(config)
    recipe = {"seed": getattr(config, "seed", 0), **config.heal_defaults()}
    heal_cfg = HealConfig(**recipe) if heal_config is None else heal_config
    heal_cfg.validate()
    if config.needs and calibration is None:
        raise SocoError(f"method {config.method!r} needs calibration token windows")
    teacher = None
    if heal_cfg.steps and (heal_windows is not None or config.teacher_windows() is None):
        heal_windows = calibration if heal_windows is None else heal_windows
        if heal_windows is None:
            raise SocoError(f"healing {config.method!r} needs token windows; pass heal_windows (or calibration)")
        teacher = teacher_cache(model, heal_windows, heal_cfg.teacher_topk, heal_cfg.batch_size)
    start = time.perf_counter()
    before = model_params(model)
    targets = check_target(model, config)
    result = handler(model, config, targets, calibration, calibration_config or config.calibration())
    report = CompressionReport.of(config.method, config.ratio, result.rows, before, model,
                                  time.perf_counter() - start, result.config)
    report.tensors.update(result.tensors)
    log.info(report.summary())
    if on_cut is not None:
        on_cut(model, report)
    if heal_cfg.steps:
        teacher = teacher if teacher is not None else result.teacher
        if teacher is None or teacher.windows is None:
            raise SocoError(f"method {config.method!r} handed back no teacher to heal against; pass heal_windows")
        heal_report(model, report, teacher, heal_cfg)
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
