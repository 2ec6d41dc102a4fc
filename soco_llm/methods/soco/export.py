"""`export_from_run`: cut a finished whole-model SoCo run at another ratio, without retraining."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from ...core.adapter import find_targets
from ...core.report import CompressionReport, model_params
from ...errors import SocoError
from ...models import load_model
from .config import SoCoConfig
from .cut import cut
from .run_folder import BASIS_FILE, SCORES_FILE, load_basis, restore_trained
from .spectral import GateState, install_spectral


def export_from_run(run_dir: str | os.PathLike, ratio: float, dtype=None) -> tuple[nn.Module, object, CompressionReport]:
    """Cut a finished run at another ratio without retraining: (model, tokenizer, report)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if meta_path.is_file() and json.loads(meta_path.read_text())["config"].get("blockwise"):
        raise SocoError(f"{str(run_dir)!r} is a blockwise run: its blocks were cut one by one at the trained ratio, "
                        "so it cannot be cut at another; train a whole-model run (blockwise=false) for that")
    if not meta_path.is_file() or not (run_dir / SCORES_FILE).is_file() or not (run_dir / BASIS_FILE).is_file():
        raise SocoError(f"{str(run_dir)!r} is not a finished SoCo run folder (needs run.json, {BASIS_FILE}, "
                        f"{SCORES_FILE}); train with `soco compress --method soco --run-dir ...` first")
    if not 0 < ratio < 1:
        raise SocoError(f"ratio must be in (0, 1), the fraction of parameters removed; got {ratio}")
    meta = json.loads(meta_path.read_text())
    cfg = SoCoConfig(**{k: v for k, v in meta["config"].items() if k != "method"})
    start = time.perf_counter()
    model, tok = load_model(meta.get("model"), dtype)
    before = model_params(model)
    targets = find_targets(model, cfg.target_modules, cfg.exclude_modules)
    layers = install_spectral(model, targets, load_basis(run_dir), GateState())
    scores = load_file(str(run_dir / SCORES_FILE))
    restore_trained(layers, scores)
    rows = cut(model, layers, ratio, cfg.deviation)
    config = cfg.record(ratio, run_dir=run_dir)
    config["trained_ratio"] = cfg.ratio
    report = CompressionReport.of("soco", ratio, rows, before, model, time.perf_counter() - start, config)
    report.tensors[SCORES_FILE] = scores
    return model, tok, report
