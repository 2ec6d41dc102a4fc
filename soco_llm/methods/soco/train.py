"""SoCo's training step over the three-stage schedule: the scores and deviations of a set of spectral layers
against a distillation loss, run by the one loop (`core/trainer.py`). It knows nothing of how the layers were
made or what the loss compares (whole model to teacher, or one block to its output)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...core.teacher import BatchLoss
from ...core.trainer import Run, train
from ...errors import SocoError
from ...learned.cut import kept_components, set_masks
from ...learned.size import SizeModel
from ...learned.spectral import GateState, SpectralLinear
from ...runtime import world
from .config import SoCoConfig
from .schedule import plan


def freeze(model: nn.Module) -> None:
    """Deterministic passes (no dropout: the student must match the teacher), nothing trainable yet."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # only scores and deviations train (train_scores turns those on)


def train_scores(layers: dict[str, SpectralLinear], gate: GateState, batch_loss: BatchLoss, cfg: SoCoConfig,
                 run_dir: Path | None, desc: str = "soco") -> list[dict]:
    """The three-stage schedule over `layers`' scores and deviations; `batch_loss` is the distillation term."""
    rank, size_world = world()
    if cfg.batch_size % size_world:
        raise SocoError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({size_world})")
    params = {f"{n}.scores": l.scores for n, l in layers.items()}
    groups = [{"params": list(params.values()), "lr": cfg.lr_scores}]
    if cfg.deviation:
        deviations = {f"{n}.deviation": l.deviation for n, l in layers.items()}
        params.update(deviations)
        groups.append({"params": list(deviations.values()), "lr": cfg.lr_bias})
    opt = torch.optim.Adam(groups)
    size = SizeModel(layers, cfg.deviation)
    fp16 = any(l.left.dtype == torch.float16 for l in layers.values())
    full_frac = (float(size.cost.sum()) + size.fixed) / size.dense

    def step(i: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        p = plan(cfg, i, full_frac)
        gate.temperature = p.temperature
        gate.log_theta = size.solve_threshold(p.keep_frac * size.dense, p.temperature)
        gate.hard = cfg.straight_through == "all" or (cfg.straight_through == "stage3" and p.stage == 3)
        if gate.hard:  # train the very model a cut at this budget would save (at the target: the final one)
            set_masks(layers, kept_components(layers, 1.0 - p.keep_frac, cfg.deviation, cfg.rank_multiple))
        kl = batch_loss(gen, rank, size_world)
        soft_frac = size.soft() / size.dense
        size_loss = cfg.size_weight * (soft_frac - p.keep_frac) ** 2
        loss = kl + size_loss
        pol = kl.new_zeros(())
        if p.polarize > 0 or p.sparsity > 0:
            gates = torch.cat([l.soft_gate() for l in layers.values()])
            pol = (gates * (1 - gates)).mean()
            off = torch.cat([l.scores.abs() * (l.gate().detach() < 0.5) for l in layers.values()]).mean()
            loss = loss + p.polarize * pol + p.sparsity * off
        return loss, {"stage": p.stage, "kl": kl, "size": size_loss, "polarize": pol, "soft_ratio": 1 - soft_frac,
                      "target": 1 - p.keep_frac, "temperature": p.temperature}

    def nan_advice(_step: int) -> str:
        # Resuming repeats the same steps (batches follow the seed), so it would diverge again.
        half = " or in --dtype bfloat16 (float16 overflows past 65504)" if fp16 else ""
        return (f"train again with a lower learning rate (e.g. --set lr_scores={cfg.lr_scores / 10:g}){half} in a "
                f"fresh run folder{' (delete ' + str(run_dir) + ')' if run_dir else ''}")

    run = Run(cfg.steps, cfg.seed, cfg.checkpoint_every, run_dir, cfg.resume, desc=desc,
              label=f"run folder {run_dir}", nan_advice=nan_advice)
    for q in params.values():
        q.requires_grad_(True)
    try:
        return train(params, opt, step, run)
    finally:
        for q in params.values():
            q.requires_grad_(False)
        gate.hard = False
