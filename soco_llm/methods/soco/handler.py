"""The SoCo handler `compress()` runs for a `SoCoConfig`: checks, the run-folder protocol, then the
whole-model or the block-wise mode; it hands back the teacher a whole-model run trained against."""

from __future__ import annotations

import torch
from torch import nn

from ...core.adapter import Target
from ...core.phases import Phases
from ...errors import SocoError
from ...runtime import world
from ...core.trainer import on_interrupt
from ..base import CalibrationConfig, MethodResult
from ...learned import run_folder, run_state
from .blockwise import compress_blockwise
from .config import SoCoConfig
from ...learned.run_folder import SCORES_FILE
from .whole_model import compress_whole_model


def compress_soco(model: nn.Module, cfg: SoCoConfig, targets: list[Target], windows: torch.Tensor | None,
                  _calibration: CalibrationConfig) -> MethodResult:
    """Train SoCo on `windows` [N, L] and cut `model` in place at cfg.ratio."""
    torch.manual_seed(cfg.seed)
    if cfg.blockwise and world()[1] > 1:
        raise SocoError("blockwise SoCo runs in one process; drop torchrun, or train the whole model (blockwise=false)")
    run_dir, cached = run_folder.prepare(cfg, getattr(model, "name_or_path", None) or None,
                                         next(model.parameters()).dtype)
    model.eval()
    phases = Phases(next(model.parameters()).device)
    teacher = None
    # Ctrl-C before training (teacher, basis) or between blocks: say what the folder holds, so --resume is a choice.
    def kept() -> str | None:
        return None if run_dir is None else f"run folder {run_dir} keeps {run_state.describe(run_dir, cfg.steps)}"

    with on_interrupt(kept):
        if cfg.blockwise:
            with phases("blocks", "lower --batch-size or --seq-len"):
                rows, final, history = compress_blockwise(model, cfg, windows, targets, run_dir)
        else:
            rows, final, history, teacher = compress_whole_model(model, cfg, windows, targets, run_dir, cached, phases)
    run_folder.finish(run_dir)
    config = cfg.record(cfg.ratio, history, run_dir)
    config["phases"] = phases.record()
    return MethodResult(rows, config, {SCORES_FILE: final}, teacher)
