"""Whole-model SoCo: every target's scores and deviations trained together by KL to the dense model,
then one global cut, so ranks move between blocks and one run can be cut at other ratios."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...core.adapter import Target
from ...core.budget import LayerRank
from ...core.phases import Phases
from .basis import decompose_targets
from .config import SoCoConfig
from ...learned.cut import cut
from ...learned.run_folder import SCORES_FILE, load_basis, load_teacher, save_cache, save_tensors, trained_tensors
from ...learned.spectral import GateState, SpectralLinear, install_spectral
from ...core.teacher import Teacher, kl_batch_loss, teacher_cache
from .train import freeze, train_scores


def train(model: nn.Module, layers: dict[str, SpectralLinear], gate: GateState, windows: torch.Tensor,
          teacher: Teacher, cfg: SoCoConfig, run_dir: Path | None) -> list[dict]:
    """The scores and deviations of every layer trained together by KL to the cached teacher."""
    freeze(model)
    return train_scores(layers, gate, kl_batch_loss(model, windows, teacher, cfg.batch_size), cfg, run_dir)


def compress_whole_model(model: nn.Module, cfg: SoCoConfig, windows: torch.Tensor, targets: list[Target],
                         run_dir: Path | None, cached: bool, phases: Phases
                         ) -> tuple[list[LayerRank], dict, list[dict], Teacher]:
    """Train and cut `model` in place: (rows, trained tensors, history, the teacher it trained against)."""
    if cached:
        teacher, basis = load_teacher(run_dir), load_basis(run_dir, next(model.parameters()).device)
        if teacher.windows is None:  # cached by a version that did not keep them: they are these windows
            teacher.windows = windows.cpu()
    else:
        with phases("teacher", "lower --batch-size, --seq-len or --set teacher_topk=N"):
            teacher = teacher_cache(model, windows, cfg.teacher_topk, cfg.batch_size)
        with phases("basis", "lower --batch-size or --set whiten_samples=N, or train block-wise (--set blockwise=true)"):
            basis = decompose_targets(model, cfg, targets, windows)
        save_cache(run_dir, basis, teacher)
    with phases("training", "lower --batch-size or --seq-len, or train block-wise (--set blockwise=true); "
                "continue with --resume from the last checkpoint"):
        gate = GateState()
        layers = install_spectral(model, targets, basis, gate)
        history = train(model, layers, gate, windows, teacher, cfg, run_dir)
    with phases("cut", "train block-wise (--set blockwise=true)"):
        final = trained_tensors(layers)
        rows = cut(model, layers, cfg.ratio, cfg.deviation, cfg.rank_multiple)
    save_tensors(run_dir, SCORES_FILE, final)
    return rows, final, history, teacher

