"""Healing after the cut: the kept factors (A, B and bias of every LowRankLinear) trained by KL to the dense
model's cached teacher, for any method's compressed model. The ranks, and so the size and the ratio, do
not change: only the values of the factors the cut kept.

`mode` says what trains: the factors themselves ("factors"; float32 master copies of a bf16 / fp16
model's), or a low-rank adapter on each factor, merged back exactly at the end ("adapter"), both in
core/factor_adapter.py; both leave the same shapes.
Checkpointed and resumable like SoCo's training: each step's batch comes from a
generator seeded by (seed, step), so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .checks import SEED, Rule, above, at_least, check_fields, one_of
from .core.factor_adapter import attach_factor_adapters, attach_factor_masters, merge_factor_parametrizations
from .core.layer import LowRankLinear
from .core.teacher import Teacher, kl_batch_loss
from .errors import SocoError
from .io.atomic import atomic_save_tensors, atomic_write_json
from .runtime import world

log = logging.getLogger(__name__)

CHECKPOINT = "heal_checkpoint.safetensors"
CHECKPOINT_META = "heal_checkpoint.json"
MODES = ("factors", "adapter")
SCHEDULES = ("constant", "cosine")
_STREAM = 500_009  # healing draws its own batches, apart from SoCo's training stream of the same seed


@dataclass
class HealConfig:
    """Healing's settings. `steps` 0 means off."""

    rules: ClassVar[dict[str, Rule]] = {"steps": at_least(0, note="0: off"), "lr": above(0),
                                        "batch_size": at_least(1), "checkpoint_every": at_least(1), "seed": SEED,
                                        "mode": one_of(*MODES), "adapter_rank": at_least(1),
                                        "schedule": one_of(*SCHEDULES)}

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

    def validate(self) -> None:
        check_fields(self, "heal setting ")


def factor_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not layers:
        raise SocoError("healing needs a compressed model (LowRankLinear layers); compress it first")
    return layers


def _save(run_dir: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
          history: list[dict], mode: str) -> None:
    tensors = {k: p.detach() for k, p in params.items()}
    for i, p in enumerate(params.values()):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).reshape(-1) if key == "step" else value
    atomic_save_tensors(run_dir / CHECKPOINT, tensors)
    atomic_write_json(run_dir / CHECKPOINT_META, {"step": step, "history": history, "mode": mode})


def heal_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the healing checkpoint in `run_dir`, None when there is none (or it cannot be read)."""
    try:
        return int(json.loads((run_dir / CHECKPOINT_META).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@torch.no_grad()
def _load(run_dir: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
          mode: str) -> tuple[int, list[dict]]:
    try:
        meta = json.loads((run_dir / CHECKPOINT_META).read_text())
        t = load_file(str(run_dir / CHECKPOINT))
    except Exception as e:  # a damaged checkpoint: say which and what to do
        raise SocoError(f"the healing checkpoint in {run_dir} is damaged ({str(e).splitlines()[0]}); delete "
                        f"{CHECKPOINT} and {CHECKPOINT_META} to heal from the start") from e
    saved_mode = meta.get("mode", "factors")  # checkpoints from before adapters trained the factors
    if saved_mode != mode:
        raise SocoError(f"the healing checkpoint in {run_dir} trained {saved_mode!r}, not {mode!r}; resume with "
                        f"--heal-mode {saved_mode}, or delete it to heal from the start")
    for i, (k, p) in enumerate(params.items()):
        if k not in t or t[k].shape != p.shape:
            raise SocoError(f"the healing checkpoint in {run_dir} is for another model ({k}); delete it or choose "
                            "another run folder")
        p.copy_(t[k])
        if f"opt.{i}.exp_avg" in t:
            opt.state[p] = {"step": t[f"opt.{i}.step"].reshape(()).clone(),
                            "exp_avg": t[f"opt.{i}.exp_avg"].to(p.device).clone(),
                            "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].to(p.device).clone()}
    return int(meta["step"]), meta["history"]


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
    """The healing loop over `params`, from the checkpoint when resuming; returns the per-step KL history."""
    rank, size = world()
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    start, history = 0, []
    if cfg.resume and run_dir is not None and (run_dir / CHECKPOINT_META).is_file():
        start, history = _load(run_dir, params, opt, cfg.mode)
        log.info("healing resumed from step %d in %s", start, run_dir)
    batch_loss = kl_batch_loss(model, windows, teacher, cfg.batch_size)
    pending: list[tuple[int, torch.Tensor]] = []  # KL per step, read once per checkpoint (no sync per step)
    bar = tqdm(range(start, cfg.steps), desc="heal", initial=start, total=cfg.steps, disable=rank != 0)
    for step in bar:
        kl = batch_loss(torch.Generator().manual_seed(cfg.seed * 1_000_003 + _STREAM + step), rank, size)
        opt.zero_grad(set_to_none=True)
        kl.backward()
        for group in opt.param_groups:
            group["lr"] = step_lr(cfg, step)
        if size > 1:
            for p in params.values():
                dist.all_reduce(p.grad)
                p.grad /= size
        opt.step()
        pending.append((step, kl.detach().float()))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            values = torch.stack([v for _, v in pending]).tolist()
            for (s, _), v in zip(pending, values):
                if v != v or v in (float("inf"), float("-inf")):
                    raise SocoError(f"the healing loss became NaN/inf at step {s + 1}; heal again with a lower "
                                    f"learning rate (e.g. --heal-lr {cfg.lr / 10:g})"
                                    + (f"; the checkpoint in {run_dir} is the last good state: add --resume to "
                                       "continue from it" if run_dir else ""))
                history.append({"step": s + 1, "kl": v})
            pending.clear()
            bar.set_postfix(kl=f"{history[-1]['kl']:.3f}")
            if run_dir is not None and rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                _save(run_dir, step + 1, params, opt, history, cfg.mode)
    return history


def heal_record(cfg: HealConfig, history: list[dict], seconds: float | None = None) -> dict:
    """What a report keeps of a healing run (`seconds`: its wall time in this process, resumed steps excluded)."""
    def mean_kl(steps: list[dict]) -> float | None:  # one step's KL is one batch's: noisy alone
        return sum(h["kl"] for h in steps) / len(steps) if steps else None

    return {**asdict(cfg), "final_kl": history[-1]["kl"] if history else None,
            "first_kl": history[0]["kl"] if history else None, "kl_first_10": mean_kl(history[:10]),
            "kl_last_10": mean_kl(history[-10:]), "seconds": seconds}
