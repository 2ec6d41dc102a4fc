"""SoCo's run folder: run.json (config, model, status), the cached basis and teacher, checkpoints
(scores, biases, Adam state, step) and the trained scores. Rank 0 writes; every write is atomic.

Batches are a function of (seed, step), so a checkpoint needs no RNG state: resuming from it
reproduces an uninterrupted run. Reading what a folder holds, and whether it may be used, is
`run_state.py`'s (it runs before anything is loaded).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from ...errors import SocoError
from ...io.atomic import atomic_save_tensors, atomic_write_json
from ...io.read import read_tensors
from ...runtime import dtype_name, world
from .basis import flatten, unflatten
from .config import SoCoConfig
from .run_state import (BASIS_FILE, CHECKPOINT_FILE, RUN_FILE, SCORES_FILE, TEACHER_FILE, check_run_dir,  # noqa: F401
                        check_run_dtype, checkpoint_step, kept_config, read_meta, start_over)
from .spectral import SpectralLinear
from ...core.teacher import Teacher

log = logging.getLogger(__name__)


def prepare(cfg: SoCoConfig, model_spec: str | None, dtype: torch.dtype) -> tuple[Path | None, bool]:
    """(run folder, whether its basis and teacher cache can be reused). Every rank checks; rank 0 writes."""
    if cfg.run_dir is None:
        return None, False
    check_run_dir(cfg)  # again: the folder may have changed since the CLI's preflight
    run_dir = Path(cfg.run_dir)
    meta = read_meta(run_dir)
    if meta is not None:
        check_run_dtype(run_dir, meta, dtype_name(dtype))
    if meta is not None and meta.get("model") != model_spec:  # may be the same model by another path: warn only
        log.warning("run folder %s was made from model %r; this run loads %r", run_dir, meta.get("model"), model_spec)
    cached = (run_dir / BASIS_FILE).is_file() and (run_dir / TEACHER_FILE).is_file()
    rank, size = world()
    if size > 1:
        dist.barrier()  # nobody writes before every rank has looked
    if rank == 0 and meta is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / RUN_FILE, {"config": kept_config(cfg), "model": model_spec, "dtype": dtype_name(dtype),
                                               "status": "running"})
    return run_dir, cached


def finish(run_dir: Path | None) -> None:
    if run_dir is not None and world()[0] == 0:
        atomic_write_json(run_dir / RUN_FILE, {**read_meta(run_dir), "status": "done"})


def save_tensors(run_dir: Path | None, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Rank 0 writes `name` into the run folder (nothing without one)."""
    if run_dir is not None and world()[0] == 0:
        atomic_save_tensors(run_dir / name, tensors)


def save_cache(run_dir: Path | None, basis: dict, teacher: Teacher | None) -> None:
    save_tensors(run_dir, BASIS_FILE, flatten(basis))
    if teacher is not None:
        save_tensors(run_dir, TEACHER_FILE, teacher.tensors())


def load_basis(run_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
               ) -> dict[str, dict[str, torch.Tensor]]:
    """The cached basis, read onto `device` (the model's: the spectral layers compute where their basis is);
    with `dtype`, its factors in that dtype (the prior and scale keep theirs)."""
    basis = unflatten(read_tensors(run_dir / BASIS_FILE, start_over(run_dir), device))
    if dtype is not None:
        for entry in basis.values():
            entry.update({k: entry[k].to(dtype) for k in ("left", "sigma", "right", "bias") if k in entry})
    return basis


def load_teacher(run_dir: Path) -> Teacher:
    return Teacher(**read_tensors(run_dir / TEACHER_FILE, start_over(run_dir)))


def trained_tensors(layers: dict[str, SpectralLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, l in layers.items():
        out[f"{name}.scores"] = l.scores.detach()
        out[f"{name}.delta"] = l.delta.detach()
        out[f"{name}.prior"] = l.prior
        out[f"{name}.sigma"] = l.spectrum().float()
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
    atomic_write_json(run_dir / CHECKPOINT_FILE, {"step": step, "history": history})


def has_checkpoint(run_dir: Path | None) -> bool:
    return run_dir is not None and (run_dir / CHECKPOINT_FILE).is_file()


def load_checkpoint(run_dir: Path, layers: dict[str, SpectralLinear], opt: torch.optim.Optimizer
                    ) -> tuple[int, list[dict]]:
    step = checkpoint_step(run_dir)
    meta = json.loads((run_dir / CHECKPOINT_FILE).read_text())
    t = read_tensors(run_dir / "checkpoint.safetensors", start_over(run_dir))
    restore_trained(layers, t)
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in t:
            opt.state[p] = {"step": t[f"opt.{i}.step"].reshape(()).clone(),
                            "exp_avg": t[f"opt.{i}.exp_avg"].view_as(p).clone().to(p.device),
                            "exp_avg_sq": t[f"opt.{i}.exp_avg_sq"].view_as(p).clone().to(p.device)}
    return step, meta.get("history", [])
