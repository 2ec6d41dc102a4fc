"""SoCo's training loop: one flat loop over the three-stage schedule that trains the scores and
biases of a set of spectral layers against a distillation loss. It knows nothing of how the
layers were made or what the loss compares (whole model to teacher, or one block to its output)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ...errors import SocoError
from ...runtime import world
from .config import SoCoConfig
from .cut import kept_components, set_masks
from .run_folder import has_checkpoint, load_checkpoint, save_checkpoint
from .schedule import SizeModel, StepPlan, plan
from .spectral import GateState, SpectralLinear
from ...core.teacher import BatchLoss

log = logging.getLogger(__name__)


def freeze(model: nn.Module) -> None:
    """Deterministic passes (no dropout: the student must match the teacher), nothing trainable yet."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # only scores and biases train (train_scores turns those on)


def train_scores(layers: dict[str, SpectralLinear], gate: GateState, batch_loss: BatchLoss, cfg: SoCoConfig,
                 run_dir: Path | None, desc: str = "soco") -> list[dict]:
    """The three-stage schedule over `layers`' scores and biases; `batch_loss` is the distillation term."""
    rank, size_world = world()
    if cfg.batch_size % size_world:
        raise SocoError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({size_world})")
    scores = [l.scores for l in layers.values()]
    deltas = [l.delta for l in layers.values()]
    for p in scores + (deltas if cfg.deviation else []):
        p.requires_grad_(True)
    groups = [{"params": scores, "lr": cfg.lr_scores}]
    if cfg.deviation:
        groups.append({"params": deltas, "lr": cfg.lr_bias})
    opt = torch.optim.Adam(groups)
    size = SizeModel(layers, cfg.deviation)
    fp16 = any(l.left.dtype == torch.float16 for l in layers.values())
    full_frac = (float(size.cost.sum()) + size.fixed) / size.dense
    start, history = 0, []
    if cfg.resume and has_checkpoint(run_dir):
        start, history = load_checkpoint(run_dir, layers, opt)
        log.info("resumed from step %d in %s", start, run_dir)
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, disable=rank != 0)
    # Per-step numbers stay on the device until a checkpoint (or the end) reads them all in one sync:
    # a step must not wait for the host (a NaN is caught there, before anything is saved).
    pending: list[tuple[int, StepPlan, torch.Tensor]] = []

    def flush() -> None:
        values = torch.stack([t for _, _, t in pending]).tolist() if pending else []
        for (step, p, _), (kl, size_loss, pol, soft_frac, finite) in zip(pending, values):
            if not finite:
                # Resuming repeats the same steps (batches follow the seed), so it would diverge again.
                half = " or in --dtype bfloat16 (float16 overflows past 65504)" if fp16 else ""
                raise SocoError(f"the loss became NaN/inf at step {step + 1}; train again with a lower learning rate "
                                f"(e.g. --set lr_scores={cfg.lr_scores / 10:g}){half} in a fresh run folder"
                                f"{' (delete ' + str(run_dir) + ')' if run_dir else ''}")
            history.append({"step": step + 1, "stage": p.stage, "kl": kl, "size": size_loss, "polarize": pol,
                            "soft_ratio": 1 - soft_frac, "target": 1 - p.keep_frac, "temperature": p.temperature})
        pending.clear()
        if history:
            h = history[-1]
            bar.set_postfix(stage=h["stage"], kl=f"{h['kl']:.3f}", size=f"{h['size']:.2e}",
                            pol=f"{h['polarize']:.3f}", ratio=f"{h['soft_ratio']:.3f}")

    try:
        for step in bar:
            p = plan(cfg, step, full_frac)
            gate.temperature = p.temperature
            gate.log_theta = size.solve_threshold(p.keep_frac * size.dense, p.temperature)
            gate.hard = cfg.straight_through == "all" or (cfg.straight_through == "stage3" and p.stage == 3)
            if gate.hard:  # train the very model a cut at this budget would save (at the target: the final one)
                set_masks(layers, kept_components(layers, 1.0 - p.keep_frac, cfg.deviation,
                                                    cfg.rank_multiple))
            # Each step's batch comes from a generator seeded by (seed, step): resuming needs only the step.
            kl = batch_loss(torch.Generator().manual_seed(cfg.seed * 1_000_003 + step), rank, size_world)
            soft_frac = size.soft() / size.dense
            size_loss = cfg.size_weight * (soft_frac - p.keep_frac) ** 2
            loss = kl + size_loss
            pol = kl.new_zeros(())
            if p.polarize > 0 or p.sparsity > 0:
                gates = torch.cat([l.soft_gate() for l in layers.values()])
                pol = (gates * (1 - gates)).mean()
                off = torch.cat([l.scores.abs() * (l.gate().detach() < 0.5) for l in layers.values()]).mean()
                loss = loss + p.polarize * pol + p.sparsity * off
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if size_world > 1:
                for q in scores + deltas:
                    if q.grad is not None:
                        dist.all_reduce(q.grad)
                        q.grad /= size_world
            opt.step()
            pending.append((step, p, torch.stack([t.detach().float() for t in
                                                  (kl, size_loss, pol, soft_frac, torch.isfinite(loss))])))
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                flush()
                if run_dir is not None and rank == 0:
                    save_checkpoint(run_dir, step + 1, layers, opt, history)
    except KeyboardInterrupt:
        flush()  # raises instead if a NaN came since the last checkpoint: then that one is the last good state
        if run_dir is not None and rank == 0 and history and history[-1]["step"] > start:
            save_checkpoint(run_dir, history[-1]["step"], layers, opt, history)  # the handler says what it kept
        raise
    finally:
        for q in scores + deltas:
            q.requires_grad_(False)
        gate.hard = False
    return history
