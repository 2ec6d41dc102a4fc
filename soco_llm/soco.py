"""SoCo: learn the singular spectrum, prune by learned scores, compensate. Our reconstruction.

1. Decompose every target linear once (plain or whitened basis) into a SpectralLinear with a
   score per component (start 1 = keep all) and a deviation bias d (start 0).
2. Train scores and biases by KL to the dense model's next-token distribution (cached top-k
   teacher log-probs from the dense model, so no second model copy and no teacher pass per
   step), under a scheduled parameter budget met every step by a global gate threshold:
     stage 1  rapid compression: the budget falls from "keep all" to the target;
     stage 2  alternating refinement: the budget swings around the target (pressure, then
              recovery) with shrinking amplitude while scores re-rank;
     stage 3  decisive sparsification: the gate temperature anneals and a polarisation term
              drives every gate to 0 or 1, so the hard cut changes the model little.
3. Cut globally by learned importance until the exact budget is met, fold √(σ·s) into both
   factors and d into the bias: an ordinary LowRankLinear model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .adapter import Target, find_targets, linear_weight, replace_module
from .compress import COMPRESSORS, CompressionReport, model_params, swap_in_lowrank
from .config import CompressionConfig, SVDConfig, SVDLLMConfig, register_method
from .decompose import Spectrum, spectrum
from .errors import SocoError
from .io import atomic_write_json
from .ranks import (LayerRank, achieved_ratio, check_reachable, global_cut, max_useful_rank, rank_table,
                    uniform_rank)
from .spectral import GateState, SpectralLinear
from .stats import BlockRunner, LayerStats

log = logging.getLogger(__name__)

SCORES_FILE = "soco_scores.safetensors"


@register_method
@dataclass
class SoCoConfig(CompressionConfig):
    """Every constant of a SoCo run. Stage lengths must add up to `steps`; a stage of 0 is off."""

    method: ClassVar[str] = "soco"
    needs: ClassVar[frozenset[str]] = frozenset()

    basis: str = "whitened"  # "whitened" (SVD-LLM style) or "plain" (the paper's SVD of W)
    cap_basis: bool = True  # train only the components a compressed layer could ever keep
    steps: int = 160
    stage_steps: list[int] | None = None  # default: 25 % / 45 % / 30 % of steps
    batch_size: int = 4
    seq_len: int = 256
    num_samples: int = 256  # training windows; fewer over-fit (64 gave train KL 0.64 vs 1.22 held out)
    whiten_samples: int | None = 64  # the first windows, for XᵀX of the whitened basis (None: all)
    seed: int = 0
    lr_scores: float = 5e-3
    lr_bias: float = 1e-3
    deviation: bool = True  # train the deviation bias d
    # Forward the hard cut at the step's budget, gradients through the soft gate (straight-through):
    # "all" stages, "stage3" only, or "off" (train the soft-gated model throughout).
    straight_through: str = "all"
    blockwise: bool = False  # one decoder block at a time against the dense block (soco_blockwise.py); steps per block
    temperature: float = 0.3  # gate temperature (in log-importance units) in stages 1-2
    final_temperature: float = 0.02  # reached at the end of stage 3
    alternate_every: int = 4  # stage 2: steps per half-swing of the budget
    alternate_amplitude: float = 0.05  # stage 2: relative budget swing at its start
    size_weight: float = 10.0  # λ_c: two-sided quadratic on (soft ratio − scheduled ratio)
    polarize_weight: float = 0.5  # λ_p: Σh(1−h) penalty, ramped in over stage 3
    sparsity_weight: float = 0.01  # λ_s: L1 on the scores of gated-off components in stage 3
    teacher_topk: int = 128  # teacher log-probs kept per token (the rest is one bucket)
    checkpoint_every: int = 20
    run_dir: str | None = None  # checkpoints, basis and teacher cache; None = no checkpoints
    resume: bool = False

    def stages(self) -> list[int]:
        if self.stage_steps is not None:
            return list(self.stage_steps)
        s1, s2 = round(0.25 * self.steps), round(0.45 * self.steps)
        return [s1, s2, self.steps - s1 - s2]

    def validate(self) -> None:
        super().validate()
        st = self.stages()
        if len(st) != 3 or any(s < 0 for s in st) or sum(st) != self.steps:
            raise SocoError(f"stage_steps {st} must be three non-negative lengths adding up to steps={self.steps}")
        if self.straight_through not in ("all", "stage3", "off"):
            raise SocoError(f"straight_through must be 'all', 'stage3' or 'off', got {self.straight_through!r}")
        if self.basis not in ("whitened", "plain"):
            raise SocoError(f"basis must be 'whitened' or 'plain', got {self.basis!r}")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.num_samples < 1:
            raise SocoError("steps, batch_size, num_samples must be >= 1 and seq_len >= 2")
        if not 0 < self.final_temperature <= self.temperature:
            raise SocoError("need 0 < final_temperature <= temperature")


# --quick: under a fifth of the training tokens (60 steps of 2×256 instead of 160 of 4×256).
QUICK = dict(steps=60, batch_size=2, num_samples=64)


# --------------------------------------------------------------------------- distributed


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group torchrun / accelerate launch set up (NCCL on GPUs, gloo on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


# --------------------------------------------------------------------------- teacher


@dataclass
class Teacher:
    """Top-k log-probs of the dense model for every training window (shifted: predictions 1..L-1)."""

    top_logp: torch.Tensor  # [N, L-1, k]
    top_idx: torch.Tensor  # [N, L-1, k] int64
    rest_logp: torch.Tensor  # [N, L-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"top_logp": self.top_logp, "top_idx": self.top_idx, "rest_logp": self.rest_logp}


@torch.no_grad()
def teacher_cache(model: nn.Module, windows: torch.Tensor, k: int, batch_size: int) -> Teacher:
    device = next(model.parameters()).device
    tops, idxs, rests = [], [], []
    for batch in tqdm(windows.split(batch_size), desc="soco teacher"):
        logp = F.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float(), -1)
        top, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
        rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
        tops.append(top.cpu()), idxs.append(idx.cpu()), rests.append(rest.cpu())
    return Teacher(torch.cat(tops), torch.cat(idxs), torch.cat(rests))


def kl_to_teacher(logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
                  rest_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the teacher's top-k tokens plus one bucket for the rest."""
    logq = F.log_softmax(logits[:, :-1].float(), -1)
    q_top = logq.gather(-1, top_idx)
    q_rest = torch.log((1 - q_top.exp().sum(-1)).clamp_min(1e-12))
    kl = (top_logp.exp() * (top_logp - q_top)).sum(-1) + rest_logp.exp() * (rest_logp - q_rest)
    return kl.mean()


# --------------------------------------------------------------------------- spectral model


def _prior(sigma: torch.Tensor, r: int) -> torch.Tensor:
    """σ relative to the uniform cut: the components a uniform rank-r cut keeps get importance > 1."""
    k = sigma.numel()
    lo, hi = sigma[min(r, k) - 1], sigma[min(r, k - 1)]
    edge = torch.sqrt(lo.clamp_min(1e-30) * hi.clamp_min(1e-30)) if r < k else lo * 0.5
    return (sigma / edge.clamp_min(1e-30)).float()


def basis_entry(target: Target, cfg: SoCoConfig, stats: LayerStats | None) -> dict[str, torch.Tensor]:
    """One target's basis (left, sigma, right, prior, bias), capped at the largest useful rank."""
    m, n = target.shape
    w = linear_weight(target.module).detach()
    method = SVDLLMConfig(ratio=cfg.ratio) if cfg.basis == "whitened" else SVDConfig(ratio=cfg.ratio)
    spec = spectrum(method, w, stats, target.name)
    k = max(max_useful_rank(m, n, m if cfg.deviation else 0), 1) if cfg.cap_basis else spec.sigma.numel()
    entry = {"left": spec.left[:, :k].to(w.dtype).contiguous(), "sigma": spec.sigma[:k].to(w.dtype),
             "right": spec.right[:k].to(w.dtype).contiguous(),
             "prior": _prior(spec.sigma[:k], uniform_rank(m, n, cfg.ratio))}
    if getattr(target.module, "bias", None) is not None:
        entry["bias"] = target.module.bias.detach().clone()
    return entry


def decompose_targets(model: nn.Module, cfg: SoCoConfig, targets: list[Target],
                      windows: torch.Tensor | None) -> dict[str, dict[str, torch.Tensor]]:
    """The basis of every target, computed one block at a time."""
    by_name = {t.name: t for t in targets}
    if cfg.basis == "plain":
        return {t.name: basis_entry(t, cfg, None) for t in tqdm(targets, desc="soco basis")}
    if windows is None:
        raise SocoError("the whitened basis needs calibration windows")
    basis: dict[str, dict[str, torch.Tensor]] = {}
    batches = list(windows[: cfg.whiten_samples].split(cfg.batch_size))
    BlockRunner(model, targets, batches).run(
        lambda i, b, stats: basis.update({n: basis_entry(by_name[n], cfg, s) for n, s in stats.items()}),
        {"xtx"}, desc="soco basis")
    return basis


def install_spectral(model: nn.Module, targets: list[Target], basis: dict, gate: GateState) -> dict[str, SpectralLinear]:
    layers = {}
    for t in targets:
        b = basis[t.name]
        layer = SpectralLinear(b["left"], b["sigma"], b["right"], b["prior"], b.get("bias"), gate)
        layer.dense_cls = type(t.module)
        replace_module(model, t.name, layer)
        layers[t.name] = layer
    return layers


# --------------------------------------------------------------------------- schedule


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


class SizeModel:
    """Soft parameter count of all spectral layers, and the threshold that meets a budget."""

    def __init__(self, layers: dict[str, SpectralLinear], deviation: bool):
        self.layers = layers
        self.dense = sum(l.out_features * l.in_features for l in layers.values())
        self.fixed = sum(l.out_features for l in layers.values()) if deviation else 0
        self.cost = torch.cat([torch.full((l.k,), float(l.out_features + l.in_features)) for l in layers.values()])

    def log_importance(self) -> torch.Tensor:
        return torch.cat([torch.log(l.importance().detach().float().cpu() + 1e-30) for l in self.layers.values()])

    def soft(self) -> torch.Tensor:
        """Differentiable soft size (parameters), through the gates."""
        return sum((l.out_features + l.in_features) * l.soft_gate().sum() for l in self.layers.values()) + self.fixed

    def solve_threshold(self, budget: float, temperature: float) -> float:
        """log θ such that Σ cost·sigmoid((log I − log θ)/T) + fixed = budget (bisection)."""
        li = self.log_importance()
        lo, hi = float(li.min()) - 40 * temperature, float(li.max()) + 40 * temperature
        target = budget - self.fixed
        if target >= float(self.cost.sum()):
            return float("-inf")  # the budget covers everything: all gates open
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            size = float((self.cost * torch.sigmoid((li - mid) / temperature)).sum())
            lo, hi = (mid, hi) if size > target else (lo, mid)
        return 0.5 * (lo + hi)


# --------------------------------------------------------------------------- checkpoints


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def trained_tensors(layers: dict[str, SpectralLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, l in layers.items():
        out[f"{name}.scores"] = l.scores.detach()
        out[f"{name}.delta"] = l.delta.detach()
        out[f"{name}.prior"] = l.prior
        out[f"{name}.sigma"] = l.sigma.float()
    return out


@torch.no_grad()
def restore_trained(layers: dict[str, SpectralLinear], tensors: dict[str, torch.Tensor]) -> None:
    """Put scores and biases saved by `trained_tensors` back into the layers."""
    for name, l in layers.items():
        l.scores.copy_(tensors[f"{name}.scores"])
        l.delta.copy_(tensors[f"{name}.delta"])


def save_checkpoint(run_dir: Path, step: int, layers: dict[str, SpectralLinear], opt: torch.optim.Optimizer,
                    history: list[dict]) -> None:
    """Scores, biases, Adam state and step; batches are a function of (seed, step), so no RNG state."""
    t = trained_tensors(layers)
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                t[f"opt.{i}.{key}"] = torch.as_tensor(st[key]).reshape(-1)
    _atomic_save(t, run_dir / "checkpoint.safetensors")
    atomic_write_json(run_dir / "checkpoint.json", {"step": step, "history": history})


def load_checkpoint(run_dir: Path, layers: dict[str, SpectralLinear], opt: torch.optim.Optimizer
                    ) -> tuple[int, list[dict]]:
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    try:
        t = load_file(str(run_dir / "checkpoint.safetensors"))
    except Exception as e:
        raise SocoError(f"checkpoint in {run_dir} is corrupt ({e}); delete it to restart the run") from e
    restore_trained(layers, t)
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in t:
            opt.state[p] = {"step": t[f"opt.{i}.step"].reshape(()).clone(),
                            "exp_avg": t[f"opt.{i}.exp_avg"].view_as(p).clone(),
                            "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].view_as(p).clone()}
    return int(meta["step"]), meta["history"]


# --------------------------------------------------------------------------- training


BatchLoss = Callable[[torch.Generator, int, int], torch.Tensor]  # (step generator, rank, world) -> loss


def kl_batch_loss(model: nn.Module, windows: torch.Tensor, teacher: Teacher, batch_size: int) -> BatchLoss:
    """KL to the cached teacher on `batch_size` windows drawn by the step's generator (split over ranks)."""
    device = next(model.parameters()).device

    def loss(gen: torch.Generator, rank: int, world: int) -> torch.Tensor:
        idx = torch.randint(0, windows.shape[0], (batch_size,), generator=gen)[rank::world]
        logits = model(input_ids=windows[idx].to(device), use_cache=False).logits
        return kl_to_teacher(logits, teacher.top_logp[idx].to(device), teacher.top_idx[idx].to(device),
                             teacher.rest_logp[idx].to(device))
    return loss


def train(model: nn.Module, layers: dict[str, SpectralLinear], gate: GateState, windows: torch.Tensor,
          teacher: Teacher, cfg: SoCoConfig, run_dir: Path | None) -> list[dict]:
    """The whole-model run: scores and biases of every layer trained by KL to the dense model."""
    model.eval()  # no dropout: the student must match the teacher's deterministic pass
    for p in model.parameters():
        p.requires_grad_(False)  # only scores and biases train (train_scores turns those on)
    return train_scores(layers, gate, kl_batch_loss(model, windows, teacher, cfg.batch_size), cfg, run_dir)


def train_scores(layers: dict[str, SpectralLinear], gate: GateState, batch_loss: BatchLoss, cfg: SoCoConfig,
                 run_dir: Path | None, desc: str = "soco") -> list[dict]:
    """The three-stage schedule over `layers`' scores and biases; `batch_loss` is the distillation term."""
    rank, world = _world()
    if cfg.batch_size % world:
        raise SocoError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    scores = [l.scores for l in layers.values()]
    deltas = [l.delta for l in layers.values()]
    for p in scores + (deltas if cfg.deviation else []):
        p.requires_grad_(True)
    groups = [{"params": scores, "lr": cfg.lr_scores}]
    if cfg.deviation:
        groups.append({"params": deltas, "lr": cfg.lr_bias})
    opt = torch.optim.Adam(groups)
    size = SizeModel(layers, cfg.deviation)
    full_frac = (float(size.cost.sum()) + size.fixed) / size.dense
    start, history = 0, []
    if cfg.resume and run_dir is not None and (run_dir / "checkpoint.json").is_file():
        start, history = load_checkpoint(run_dir, layers, opt)
        log.info("resumed from step %d in %s", start, run_dir)
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, disable=rank != 0)
    step = start
    try:
        for step in bar:
            p = plan(cfg, step, full_frac)
            gate.temperature = p.temperature
            gate.log_theta = size.solve_threshold(p.keep_frac * size.dense, p.temperature)
            gate.hard = cfg.straight_through == "all" or (cfg.straight_through == "stage3" and p.stage == 3)
            if gate.hard:  # train the very model a cut at this budget would save (at the target: the final one)
                set_masks(layers, kept_components(layers, 1.0 - p.keep_frac, cfg.deviation))
            # Each step's batch comes from a generator seeded by (seed, step): resuming needs only the step.
            kl = batch_loss(torch.Generator().manual_seed(cfg.seed * 1_000_003 + step), rank, world)
            soft_frac = size.soft() / size.dense
            size_loss = cfg.size_weight * (soft_frac - p.keep_frac) ** 2
            loss = kl + size_loss
            pol = torch.zeros(())
            if p.polarize > 0 or p.sparsity > 0:
                gates = torch.cat([l.soft_gate() for l in layers.values()])
                pol = (gates * (1 - gates)).mean()
                off = torch.cat([l.scores.abs() * (l.gate().detach() < 0.5) for l in layers.values()]).mean()
                loss = loss + p.polarize * pol + p.sparsity * off
            if not torch.isfinite(loss):
                raise SocoError(f"the loss became NaN/inf at step {step}; the last good checkpoint is kept"
                                f"{' in ' + str(run_dir) if run_dir else ''}; lower --lr or resume with --resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for q in scores + deltas:
                    if q.grad is not None:
                        dist.all_reduce(q.grad)
                        q.grad /= world
            opt.step()
            rec = {"step": step + 1, "stage": p.stage, "kl": float(kl.detach()), "size": float(size_loss.detach()),
                   "polarize": float(pol.detach()), "soft_ratio": 1 - float(soft_frac.detach()), "target": 1 - p.keep_frac,
                   "temperature": p.temperature}
            history.append(rec)
            bar.set_postfix(stage=p.stage, kl=f"{rec['kl']:.3f}", size=f"{rec['size']:.2e}",
                            pol=f"{rec['polarize']:.3f}", ratio=f"{rec['soft_ratio']:.3f}")
            if run_dir is not None and rank == 0 and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(run_dir, step + 1, layers, opt, history)
    except KeyboardInterrupt:
        if run_dir is not None and rank == 0 and history and history[-1]["step"] > start:
            save_checkpoint(run_dir, history[-1]["step"], layers, opt, history)
            log.warning("interrupted: checkpoint at step %d in %s; continue with --resume", history[-1]["step"], run_dir)
        raise
    finally:
        for q in scores + deltas:
            q.requires_grad_(False)
        gate.hard = False
    return history


# --------------------------------------------------------------------------- cut


@torch.no_grad()
def kept_components(layers: dict[str, SpectralLinear], ratio: float, deviation: bool) -> dict[str, list[int]]:
    """The global cut by learned importance at the exact parameter budget of `ratio`."""
    shapes = {n: (l.out_features, l.in_features) for n, l in layers.items()}
    budget = int(math.floor((1.0 - ratio) * sum(m * n for m, n in shapes.values())))
    return global_cut({n: l.importance() for n, l in layers.items()}, shapes, budget, bias_per_layer=deviation)


@torch.no_grad()
def set_masks(layers: dict[str, SpectralLinear], kept: dict[str, list[int]]) -> None:
    for name, l in layers.items():
        l.mask.zero_()
        l.mask[torch.tensor(kept[name], dtype=torch.long)] = 1.0


@torch.no_grad()
def cut(model: nn.Module, layers: dict[str, SpectralLinear], ratio: float, deviation: bool) -> list[LayerRank]:
    """Global cut by learned importance to the exact budget; fold √(σ·s) and d; swap in LowRankLinear."""
    shapes = {n: (l.out_features, l.in_features) for n, l in layers.items()}
    kept = kept_components(layers, ratio, deviation)
    rows = []
    for name, l in layers.items():
        idx = torch.tensor(sorted(kept[name]), dtype=torch.long)
        spec = Spectrum(l.left[:, idx].double(), l.sigma[idx].double(), l.right[idx].double())
        A, B = spec.factors(idx.numel(), l.scores[idx].double())
        bias = l.orig_bias.double() if l.orig_bias is not None else None
        if deviation:
            bias = l.delta.double() if bias is None else bias + l.delta.double()
        swap_in_lowrank(model, name, A.to(l.left.dtype), B.to(l.left.dtype),
                        None if bias is None else bias.to(l.left.dtype), l.dense_cls)
        rows.append(LayerRank(name, *shapes[name], idx.numel()))
    return rows


def _report(cfg: SoCoConfig, ratio: float, rows: list[LayerRank], before: int, model: nn.Module,
            seconds: float, history: list[dict] | None = None) -> CompressionReport:
    config = cfg.to_dict()
    config["ratio"] = ratio
    if history:
        config["final_train"] = history[-1]
    return CompressionReport(method="soco", target_ratio=ratio, achieved_ratio=achieved_ratio(rows, cfg.deviation),
                             layers=rank_table(rows, cfg.deviation), model_params_before=before,
                             model_params_after=model_params(model), seconds=seconds, config=config)


# --------------------------------------------------------------------------- entry points


def _prepare_run_dir(cfg: SoCoConfig, model_spec: str | None) -> tuple[Path | None, bool]:
    """(run folder, whether its basis and teacher cache can be reused). Every rank checks; rank 0 writes."""
    if cfg.run_dir is None:
        return None, False
    run_dir = Path(cfg.run_dir)
    meta_path = run_dir / "run.json"
    keep = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "run_dir", "checkpoint_every")}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if not cfg.resume:
            raise SocoError(f"run folder {str(run_dir)!r} already holds a run; pass --resume to continue it "
                            "or choose another --run-dir")
        if meta["config"] != keep:
            raise SocoError(f"run folder {str(run_dir)!r} was made with a different config; resume with the same settings")
    cached = (run_dir / "basis.safetensors").is_file() and (run_dir / "teacher.safetensors").is_file()
    rank, world = _world()
    if world > 1:
        dist.barrier()  # nobody writes before every rank has looked
    if rank == 0 and not meta_path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, {"config": keep, "model": model_spec, "status": "running"})
    return run_dir, cached


def compress_soco(model: nn.Module, cfg: SoCoConfig, calibration: torch.Tensor | None,
                  calibration_config=None) -> CompressionReport:
    """Train SoCo on `calibration` windows [N, L] and cut `model` in place at cfg.ratio."""
    cfg.validate()
    if calibration is None:
        raise SocoError("SoCo needs calibration token windows to train on")
    init_distributed()
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    before = model_params(model)
    targets = find_targets(model, cfg.target_modules, cfg.exclude_modules)
    shapes = {t.name: t.shape for t in targets}
    check_reachable(shapes, int((1 - cfg.ratio) * sum(m * n for m, n in shapes.values())), cfg.deviation)
    run_dir, cached = _prepare_run_dir(cfg, getattr(model, "name_or_path", None) or None)
    windows = calibration
    rank, world = _world()
    model.eval()
    if cfg.blockwise:
        if world > 1:
            raise SocoError("blockwise SoCo runs in one process; drop torchrun, or train the whole model (blockwise=false)")
        from .soco_blockwise import compress_soco_blockwise

        report = compress_soco_blockwise(model, cfg, windows, targets, run_dir)
        _finish_run(run_dir, report)
        return report
    if cached:
        teacher = Teacher(**load_file(str(run_dir / "teacher.safetensors")))
        basis = _unflatten(load_file(str(run_dir / "basis.safetensors")))
    else:
        teacher = teacher_cache(model, windows, cfg.teacher_topk, cfg.batch_size)
        basis = decompose_targets(model, cfg, targets, windows)
        if run_dir is not None and rank == 0:
            _atomic_save(teacher.tensors(), run_dir / "teacher.safetensors")
            _atomic_save(_flatten(basis), run_dir / "basis.safetensors")
    gate = GateState()
    layers = install_spectral(model, targets, basis, gate)
    history = train(model, layers, gate, windows, teacher, cfg, run_dir)
    final = trained_tensors(layers)
    rows = cut(model, layers, cfg.ratio, cfg.deviation)
    if run_dir is not None and rank == 0:
        _atomic_save(final, run_dir / SCORES_FILE)
    report = _report(cfg, cfg.ratio, rows, before, model, time.perf_counter() - start, history)
    report.tensors[SCORES_FILE] = final  # saved beside the model
    _finish_run(run_dir, report)
    log.info(report.summary())
    return report


def _finish_run(run_dir: Path | None, report: CompressionReport) -> None:
    report.config["run_dir"] = str(run_dir) if run_dir else None
    if run_dir is not None and _world()[0] == 0:
        meta = json.loads((run_dir / "run.json").read_text())
        atomic_write_json(run_dir / "run.json", {**meta, "status": "done"})


def _flatten(basis: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{name}::{k}": v for name, entry in basis.items() for k, v in entry.items()}


def _unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        name, k = key.split("::")
        out.setdefault(name, {})[k] = v
    return out


def export_from_run(run_dir: str | os.PathLike, ratio: float, dtype=None) -> tuple[nn.Module, object, CompressionReport]:
    """Cut a finished run at another ratio without retraining: (model, tokenizer, report)."""
    from .models import load_model

    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if meta_path.is_file() and json.loads(meta_path.read_text())["config"].get("blockwise"):
        raise SocoError(f"{str(run_dir)!r} is a blockwise run: its blocks were cut one by one at the trained ratio, "
                        "so it cannot be cut at another; train a whole-model run (blockwise=false) for that")
    if not meta_path.is_file() or not (run_dir / SCORES_FILE).is_file() or not (run_dir / "basis.safetensors").is_file():
        raise SocoError(f"{str(run_dir)!r} is not a finished SoCo run folder (needs run.json, basis.safetensors, "
                        f"{SCORES_FILE}); train with `soco compress --method soco --run-dir ...` first")
    if not 0 < ratio < 1:
        raise SocoError(f"ratio must be in (0, 1), the fraction of parameters removed; got {ratio}")
    meta = json.loads(meta_path.read_text())
    cfg = SoCoConfig(**{k: v for k, v in meta["config"].items() if k != "method"})
    start = time.perf_counter()
    model, tok = load_model(meta.get("model"), dtype)
    before = model_params(model)
    targets = find_targets(model, cfg.target_modules, cfg.exclude_modules)
    layers = install_spectral(model, targets, _unflatten(load_file(str(run_dir / "basis.safetensors"))), GateState())
    scores = load_file(str(run_dir / SCORES_FILE))
    restore_trained(layers, scores)
    rows = cut(model, layers, ratio, cfg.deviation)
    report = _report(cfg, ratio, rows, before, model, time.perf_counter() - start)
    report.config["run_dir"] = str(run_dir)
    report.config["trained_ratio"] = cfg.ratio
    report.tensors[SCORES_FILE] = scores
    return model, tok, report


COMPRESSORS["soco"] = compress_soco
