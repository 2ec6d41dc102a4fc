"""Healing after the cut: the kept factors (A, B and bias of every LowRankLinear) trained by KL to the dense
model's cached teacher, for any method's compressed model. The ranks, and so the size and the ratio, do
not change: only the values of the factors the cut kept.

`mode` says what trains: the factors themselves ("factors"; float32 master copies of a bf16 / fp16
model's), or a low-rank adapter on each factor, merged back exactly at the end ("adapter"), both in
core/factor_params.py; both leave the same shapes.
Run by the one training loop (`core/trainer.py`), so checkpointed and resumable as SoCo's training is: each
step's batch comes from a generator seeded by (seed, step), so a resumed run ends where an uninterrupted one
does; its checkpoint records the mode, which a resume must repeat.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .checks import SEED, Rule, above, at_least, check_fields, one_of
from .core.factor_params import attach_factor_adapters, attach_factor_masters, merge_factor_parametrizations
from .core.layer import LowRankLinear
from .core.teacher import Teacher, kl_batch_loss
from .core.trainer import Run, checkpoint_step, train
from .errors import SocoError
from .runtime import world

log = logging.getLogger(__name__)

MODES = ("factors", "adapter")
SCHEDULES = ("constant", "cosine")
_STREAM = 500_009  # healing draws its own batches, apart from SoCo's training stream of the same seed


@dataclass
class HealConfig:
    """Healing's settings. `steps` 0 means off."""

    rules: ClassVar[dict[str, Rule]] = {"steps": at_least(0, note="0: off"), "lr": above(0),
                                        "batch_size": at_least(1), "checkpoint_every": at_least(1), "seed": SEED,
                                        "mode": one_of(*MODES), "adapter_rank": at_least(1),
                                        "schedule": one_of(*SCHEDULES), "num_samples": at_least(1),
                                        "seq_len": at_least(2), "teacher_topk": at_least(1)}

    steps: int = 0
    lr: float = 1e-4
    schedule: str = "constant"  # "cosine": a linear warm-up over the first 5 % of the steps, then down to 0
    batch_size: int = 4
    seed: int = 0
    checkpoint_every: int = 20
    mode: str = "factors"  # what trains: "factors" (A, B, bias) or "adapter" (a rank-`adapter_rank` update of each)
    adapter_rank: int = 16
    run_dir: str | None = None  # checkpoints; None = none
    resume: bool = False
    # The windows the CLI heals every method on, and the teacher's top-k: SoCo's default training windows, so
    # a default SoCo run's cached teacher is the one healing wants (tests/test_heal.py checks they agree).
    num_samples: int = 256
    seq_len: int = 256
    teacher_topk: int = 128

    def validate(self) -> None:
        check_fields(self, "heal setting ")

    def teacher_windows(self) -> tuple[int, int, int, int]:
        """(windows, window length, seed, top-k): compared with `CompressionConfig.teacher_windows()`."""
        return self.num_samples, self.seq_len, self.seed, self.teacher_topk


def factor_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not layers:
        raise SocoError("healing needs a compressed model (LowRankLinear layers); compress it first")
    return layers


def heal_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the healing checkpoint in `run_dir`, None when there is none; one an older soco-llm wrote
    is refused in one line (`core/trainer.py`)."""
    return checkpoint_step(run_dir)


def heal(model: nn.Module, teacher: Teacher, windows: torch.Tensor, cfg: HealConfig) -> list[dict]:
    """Heal `model`'s LowRankLinear layers in place (their factors, or adapters merged into them at the end);
    returns the per-step KL history."""
    cfg.validate()
    if cfg.steps == 0:
        return []
    layers = factor_layers(model)
    _, size = world()
    if cfg.batch_size % size:
        raise SocoError(f"heal batch_size {cfg.batch_size} must be divisible by the number of processes ({size})")
    model.eval()  # deterministic passes: the student must match the teacher's
    for p in model.parameters():
        p.requires_grad_(False)
    params = (attach_factor_masters(layers) if cfg.mode == "factors"
              else attach_factor_adapters(layers, cfg.adapter_rank, cfg.seed))
    try:
        return _train(model, params, teacher, windows, cfg)
    finally:
        for p in params.values():
            p.requires_grad_(False)
        merge_factor_parametrizations(layers)  # plain factors again, whatever happened


def step_lr(cfg: HealConfig, step: int) -> float:
    """The learning rate of step `step` (0-based): a function of the step alone, so a resumed run has the same."""
    if cfg.schedule == "constant":
        return cfg.lr
    warmup = max(1, cfg.steps // 20)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))


def _train(model: nn.Module, params: dict[str, nn.Parameter], teacher: Teacher, windows: torch.Tensor,
           cfg: HealConfig) -> list[dict]:
    """Healing's step (KL to the cached teacher at the step's learning rate), run by the one loop."""
    rank, size = world()
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    batch_loss = kl_batch_loss(model, windows, teacher, cfg.batch_size)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None

    def step(i: int, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        for group in opt.param_groups:
            group["lr"] = step_lr(cfg, i)
        kl = batch_loss(gen, rank, size)
        return kl, {"kl": kl}

    def nan_advice(_step: int) -> str:
        return (f"heal again with a lower learning rate (e.g. --heal-lr {cfg.lr / 10:g})"
                + (f"; the checkpoint in {run_dir} is the last good state: add --resume to continue from it"
                   if run_dir else ""))

    for p in params.values():
        p.requires_grad_(True)
    run = Run(cfg.steps, cfg.seed, cfg.checkpoint_every, run_dir, cfg.resume, stream=_STREAM, desc="heal",
              label=f"the healing folder {run_dir}", settings={"mode": cfg.mode}, nan_advice=nan_advice)
    return train(params, opt, step, run)


def heal_report(model: nn.Module, report, teacher: Teacher, cfg: HealConfig) -> None:
    """Heal `model` against `teacher` on the windows it was cached for; `report` (a CompressionReport) records it."""
    start = time.perf_counter()
    history = heal(model, teacher, teacher.windows, cfg)
    report.config["heal"] = heal_record(cfg, history, time.perf_counter() - start)


def heal_record(cfg: HealConfig, history: list[dict], seconds: float | None = None) -> dict:
    """What a report keeps of a healing run (`seconds`: its wall time in this process, resumed steps excluded)."""
    def mean_kl(steps: list[dict]) -> float | None:  # one step's KL is one batch's: noisy alone
        return sum(h["kl"] for h in steps) / len(steps) if steps else None

    return {**asdict(cfg), "final_kl": history[-1]["kl"] if history else None,
            "first_kl": history[0]["kl"] if history else None, "kl_first_10": mean_kl(history[:10]),
            "kl_last_10": mean_kl(history[-10:]), "seconds": seconds}
