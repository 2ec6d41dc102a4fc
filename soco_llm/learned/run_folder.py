"""A learned method's run folder: run.json (config, model, dtype, status), the cached basis and teacher,
the trainer's checkpoint (`core/trainer.py`) and the trained scores. Rank 0 writes; every write is atomic.
Any learned method uses it through `prepare` / `finish` and the readers and writers below.

Batches are a function of (seed, step), so a checkpoint needs no RNG state: resuming from it
reproduces an uninterrupted run. Reading what a folder holds, and whether it may be used, is
`run_state.py`'s (it runs before anything is loaded).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from ..core.teacher import Teacher
from ..io.atomic import atomic_save_tensors, atomic_write_json
from ..io.read import read_tensors
from ..runtime import dtype_name, world
from .run_state import (BASIS_FILE, RUN_FILE, SCORES_FILE, TEACHER_FILE, check_run_dir,  # noqa: F401
                        check_run_dtype, kept_config, read_meta, start_over)
from .spectral import SpectralLinear

log = logging.getLogger(__name__)


def prepare(cfg, model_spec: str | None, dtype: torch.dtype) -> tuple[Path | None, bool]:
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


def flatten(basis: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{name}::{k}": v for name, entry in basis.items() for k, v in entry.items()}


def unflatten(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        name, k = key.split("::")
        out.setdefault(name, {})[k] = v
    return out


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
        out[f"{name}.deviation"] = l.deviation.detach()
        out[f"{name}.prior"] = l.prior
        out[f"{name}.sigma"] = l.spectrum().float()
    return out


@torch.no_grad()
def restore_trained(layers: dict[str, SpectralLinear], tensors: dict[str, torch.Tensor]) -> None:
    """Put scores and deviations saved by `trained_tensors` back into the layers."""
    for name, l in layers.items():
        l.scores.copy_(tensors[f"{name}.scores"])
        # Runs written before d had one name stored it as `.delta`: same tensor, read either way.
        l.deviation.copy_(tensors[f"{name}.deviation"] if f"{name}.deviation" in tensors else tensors[f"{name}.delta"])
