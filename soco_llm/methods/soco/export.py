"""`export_from_run`: cut a finished whole-model SoCo run at another ratio, without retraining; `run_config`
checks the run folder first."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from ...checks import check
from ...core.adapter import find_targets
from ...core.report import CompressionReport, model_params
from ...errors import SocoError
from ...io.read import read_tensors
from ...models import load_model
from ..base import CompressionConfig, config_for
from .config import SoCoConfig
from .cut import cut
from .run_folder import BASIS_FILE, RUN_FILE, SCORES_FILE, load_basis, read_meta, restore_trained
from .run_state import run_dtype, start_over
from .spectral import GateState, install_spectral


def run_config(run_dir: str | os.PathLike) -> tuple[SoCoConfig, dict]:
    """The validated config and run.json of a finished whole-model run that can be cut at another ratio;
    cheap (no tensors read), so the CLI asks before loading anything."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    if meta is not None and meta["config"].get("blockwise") is True:  # it has no basis file to name as missing
        raise SocoError(f"{str(run_dir)!r} is a blockwise run: its blocks were cut one by one at the trained ratio, "
                        "so it cannot be cut at another; train a whole-model run (blockwise=false) for that")
    if meta is None or not (run_dir / SCORES_FILE).is_file() or not (run_dir / BASIS_FILE).is_file():
        raise SocoError(f"{str(run_dir)!r} is not a finished SoCo run folder (needs {RUN_FILE}, {BASIS_FILE}, "
                        f"{SCORES_FILE}); train with `soco compress --method soco --run-dir ...` first")
    settings = {k: v for k, v in meta["config"].items() if k != "method"}
    if meta["config"].get("method", "soco") != "soco":
        raise SocoError(f"{run_dir / RUN_FILE} records method {meta['config']['method']!r}, not soco")
    try:
        cfg = config_for("soco", **settings)
    except SocoError as e:  # written by another version of soco-llm, or edited by hand
        raise SocoError(f"{run_dir / RUN_FILE}: {e}; it was not written by this soco-llm version") from None
    return cfg, meta


def export_from_run(run_dir: str | os.PathLike, ratio: float, dtype=None, device: str | torch.device = "cpu"
                    ) -> tuple[nn.Module, object, CompressionReport]:
    """Cut a finished run at another ratio without retraining: (model, tokenizer, report). `dtype`: default, the
    run's own (the model's checkpoint may be in another); the cut itself is computed in fp64 either way."""
    run_dir = Path(run_dir)
    cfg, meta = run_config(run_dir)
    check("ratio", ratio, float, CompressionConfig.rules["ratio"])
    start = time.perf_counter()
    model, tok = load_model(meta.get("model"), dtype or run_dtype(run_dir, meta), device)
    before = model_params(model)
    targets = find_targets(model, cfg.target_modules, cfg.exclude_modules)
    p = next(model.parameters())
    layers = install_spectral(model, targets, load_basis(run_dir, p.device, p.dtype), GateState())
    scores = read_tensors(run_dir / SCORES_FILE, start_over(run_dir))
    restore_trained(layers, scores)
    rows = cut(model, layers, ratio, cfg.deviation, cfg.rank_multiple)
    config = cfg.record(ratio, run_dir=run_dir)
    config["trained_ratio"] = cfg.ratio
    report = CompressionReport.of("soco", ratio, rows, before, model, time.perf_counter() - start, config)
    report.tensors[SCORES_FILE] = scores
    return model, tok, report
