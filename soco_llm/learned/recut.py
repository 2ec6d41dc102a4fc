"""The re-cut of a finished learned run at another ratio, without retraining (`soco export`), for any learned
method: its run.json names the method, whose config is rebuilt from the recorded settings; the basis and the
trained scores and deviations go back into spectral layers, and `cut.py` cuts them at the new budget.
`run_config` reads and checks the run folder first (no tensors), so the CLI asks before loading a model."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from ..checks import check
from ..core.adapter import find_targets
from ..core.report import CompressionReport, model_params
from ..errors import SocoError
from ..io.read import read_tensors
from ..methods.base import METHODS, CompressionConfig, config_for
from ..models import load_model
from .config import LearnedConfig
from .cut import cut
from .run_folder import BASIS_FILE, RUN_FILE, SCORES_FILE, load_basis, read_meta, restore_trained
from .run_state import run_dtype, start_over
from .spectral import GateState, install_spectral


def run_config(run_dir: str | os.PathLike) -> tuple[LearnedConfig, dict]:
    """The validated config and run.json of a finished run that can be cut at another ratio; cheap (no tensors
    read). A run.json without a method is SoCo's (the only learned method when such folders were written)."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    method = meta["config"].get("method", "soco") if meta is not None else None
    cls = METHODS.get(method)
    if meta is not None and (cls is None or not issubclass(cls, LearnedConfig)):
        raise SocoError(f"{run_dir / RUN_FILE} records method {method!r}, which is not a learned method of this "
                        f"soco-llm; learned methods: {', '.join(sorted(learned_methods()))}")
    refusal = cls.recut_refusal(meta) if meta is not None else None
    if refusal:  # before the files check: a run that cannot be cut may lack them by design
        raise SocoError(f"{str(run_dir)!r}: {refusal}")
    if meta is None or not (run_dir / SCORES_FILE).is_file() or not (run_dir / BASIS_FILE).is_file():
        raise SocoError(f"{str(run_dir)!r} is not a finished run folder of a learned method (needs {RUN_FILE}, "
                        f"{BASIS_FILE}, {SCORES_FILE}); train with `soco compress --method M --run-dir ...` first")
    settings = {k: v for k, v in meta["config"].items() if k != "method"}
    try:
        cfg = config_for(method, **settings)
    except SocoError as e:  # written by another version of soco-llm, or edited by hand
        raise SocoError(f"{run_dir / RUN_FILE}: {e}; it was not written by this soco-llm version") from None
    return cfg, meta


def learned_methods() -> list[str]:
    return [m for m, c in METHODS.items() if issubclass(c, LearnedConfig)]


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
    report = CompressionReport.of(cfg.method, ratio, rows, before, model, time.perf_counter() - start, config)
    report.tensors[SCORES_FILE] = scores
    return model, tok, report
