"""The SoCo handler `compress()` runs for a `SoCoConfig`: checks, the run-folder protocol, then the
whole-model or the block-wise mode."""

from __future__ import annotations

import torch
from torch import nn

from ...core.adapter import Target
from ...core.phases import Phases
from ...errors import SocoError
from ...runtime import world
from ..base import CalibrationConfig, Interrupted, MethodResult
from . import run_folder, run_state
from .blockwise import compress_blockwise
from .config import SoCoConfig
from .run_folder import SCORES_FILE
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
    try:
        if cfg.blockwise:
            with phases("blocks", "lower --batch-size or --seq-len"):
                rows, final, history = compress_blockwise(model, cfg, windows, targets, run_dir)
        else:
            rows, final, history = compress_whole_model(model, cfg, windows, targets, run_dir, cached, phases)
    except KeyboardInterrupt:
        if run_dir is None:
            raise
        # The training loop has saved its checkpoint by now; say what the folder holds, so --resume is a choice.
        raise Interrupted(f"run folder {run_dir} keeps {run_state.describe(run_dir, cfg.steps)}") from None
    run_folder.finish(run_dir)
    config = cfg.record(cfg.ratio, history, run_dir)
    config["phases"] = phases.record()
    return MethodResult(rows, config, {SCORES_FILE: final})
