"""SoCo's run folder: run.json (config, model, status), the cached basis and teacher, checkpoints
(scores, biases, Adam state, step) and the trained scores. Rank 0 writes; every write is atomic.

Batches are a function of (seed, step), so a checkpoint needs no RNG state: resuming from it
reproduces an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from ...errors import SocoError
from ...io.atomic import atomic_save_tensors, atomic_write_json
from ...runtime import world
from .basis import flatten, unflatten
from .config import SoCoConfig
from .spectral import SpectralLinear
from .teacher import Teacher

log = logging.getLogger(__name__)

SCORES_FILE = "soco_scores.safetensors"
BASIS_FILE = "basis.safetensors"
TEACHER_FILE = "teacher.safetensors"
# Settings that may differ between a run and its resumption.
RESUMABLE = ("resume", "run_dir", "checkpoint_every")


def prepare(cfg: SoCoConfig, model_spec: str | None) -> tuple[Path | None, bool]:
    """(run folder, whether its basis and teacher cache can be reused). Every rank checks; rank 0 writes."""
    if cfg.run_dir is None:
        return None, False
    run_dir = Path(cfg.run_dir)
    meta_path = run_dir / "run.json"
    keep = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if not cfg.resume:
            raise SocoError(f"run folder {str(run_dir)!r} already holds a run; pass --resume to continue it "
                            "or choose another --run-dir")
        if meta["config"] != keep:
            raise SocoError(f"run folder {str(run_dir)!r} was made with a different config; resume with the same settings")
    cached = (run_dir / BASIS_FILE).is_file() and (run_dir / TEACHER_FILE).is_file()
    rank, size = world()
    if size > 1:
        dist.barrier()  # nobody writes before every rank has looked
    if rank == 0 and not meta_path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, {"config": keep, "model": model_spec, "status": "running"})
    return run_dir, cached


def finish(run_dir: Path | None) -> None:
    if run_dir is not None and world()[0] == 0:
        meta = json.loads((run_dir / "run.json").read_text())
        atomic_write_json(run_dir / "run.json", {**meta, "status": "done"})


def save_tensors(run_dir: Path | None, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Rank 0 writes `name` into the run folder (nothing without one)."""
    if run_dir is not None and world()[0] == 0:
        atomic_save_tensors(run_dir / name, tensors)


def save_cache(run_dir: Path | None, basis: dict, teacher: Teacher | None) -> None:
    save_tensors(run_dir, BASIS_FILE, flatten(basis))
    if teacher is not None:
        save_tensors(run_dir, TEACHER_FILE, teacher.tensors())


def load_basis(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return unflatten(load_file(str(run_dir / BASIS_FILE)))


def load_teacher(run_dir: Path) -> Teacher:
    return Teacher(**load_file(str(run_dir / TEACHER_FILE)))


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
    """Scores, biases, Adam state and step."""
    t = trained_tensors(layers)
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                t[f"opt.{i}.{key}"] = torch.as_tensor(st[key]).reshape(-1)
    atomic_save_tensors(run_dir / "checkpoint.safetensors", t)
    atomic_write_json(run_dir / "checkpoint.json", {"step": step, "history": history})


def has_checkpoint(run_dir: Path | None) -> bool:
    return run_dir is not None and (run_dir / "checkpoint.json").is_file()


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
                            "exp_avg": t[f"opt.{i}.exp_avg"].view_as(p).clone().to(p.device),
                            "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].view_as(p).clone().to(p.device)}
    return int(meta["step"]), meta["history"]
