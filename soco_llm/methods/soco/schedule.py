"""SoCo's schedule: the budget, temperature and penalty weights of every step (three stages). The soft size
that meets each step's budget is the shared `learned.size.SizeModel`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import SoCoConfig


@dataclass
class StepPlan:
    stage: int
    keep_frac: float  # scheduled budget as a fraction of the dense decoder-linear parameters
    temperature: float
    polarize: float
    sparsity: float


def plan(cfg: SoCoConfig, step: int, full_frac: float) -> StepPlan:
    s1, s2, s3 = cfg.stages()
    target = 1.0 - cfg.ratio
    if step < s1:  # rapid compression, cosine from keep-all to the target
        a = 0.5 * (1 - math.cos(math.pi * (step + 1) / s1))
        return StepPlan(1, full_frac + (target - full_frac) * a, cfg.temperature, 0.0, 0.0)
    if step < s1 + s2:  # alternating refinement, the swing decays to zero
        t = step - s1
        sign = -1.0 if (t // max(cfg.alternate_every, 1)) % 2 == 0 else 1.0
        amp = cfg.alternate_amplitude * (1 - t / s2)
        return StepPlan(2, target * (1 + sign * amp), cfg.temperature, 0.0, 0.0)
    t = (step - s1 - s2 + 1) / max(s3, 1)  # decisive sparsification
    temp = cfg.temperature * (cfg.final_temperature / cfg.temperature) ** t
    return StepPlan(3, target, temp, cfg.polarize_weight * t, cfg.sparsity_weight * t)
