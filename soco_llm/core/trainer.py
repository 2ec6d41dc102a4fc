"""The one training loop, flat as nanoGPT's: SoCo's training, healing and every block-level stage run it.

It owns the step order (a batch drawn from a generator seeded by (seed, stream, step), the loss, backward,
the gradient all-reduce across processes, the optimizer step), the per-step numbers (kept on the device and
read once per checkpoint: a step never waits for the host), the NaN check before anything is saved, the one
checkpoint scheme (`checkpoint.safetensors`: the trained tensors and their Adam state, both keyed by the
tensor's name; `checkpoint.json`: format, step, history and the caller's settings; rank 0 writes, atomically)
and its resume, and Ctrl-C: the last good state is saved and `Interrupted` says what was kept (`on_interrupt`
is the one place that raises it). Because batches are a function of (seed, step), a checkpoint needs no RNG
state: resuming from it reproduces an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import SocoError
from ..io.atomic import atomic_save_tensors, atomic_write_json
from ..runtime import world

log = logging.getLogger(__name__)

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_FILE = "checkpoint.json"
FORMAT = 2  # 1: before the one trainer (SoCo's and healing's own encodings): refused, not guessed at
ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")

# (step, the step's batch generator) -> (loss, the numbers the history records: 0-dim tensors or floats)
Step = Callable[[int, torch.Generator], tuple[torch.Tensor, dict]]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a run that keeps resumable state on disk; `kept` says what, e.g. "run folder X keeps the
    checkpoint at step 108 of 160". The CLI prints it with the command that continues the run."""

    def __init__(self, kept: str):
        super().__init__(kept)
        self.kept = kept


@contextlib.contextmanager
def on_interrupt(kept: Callable[[], str | None]) -> Iterator[None]:
    """Ctrl-C inside becomes `Interrupted(kept())`, where `kept()` says what is on disk (None: nothing, a plain
    KeyboardInterrupt goes on). An `Interrupted` from an inner run already says it and goes on unchanged."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        what = kept()
        if what is None:
            raise
        raise Interrupted(what) from None


@dataclass
class Run:
    """How one loop runs: its length, its batches' seed, where and how often it checkpoints, what it says."""

    steps: int
    seed: int
    checkpoint_every: int = 20
    run_dir: Path | None = None  # None: no checkpoints
    resume: bool = False
    stream: int = 0  # loops of the same seed draw apart (healing after SoCo's training)
    desc: str = "train"
    label: str = ""  # what the run folder is, as a message names it: "run folder X"
    settings: dict = field(default_factory=dict)  # recorded with the checkpoint; a resume must repeat them
    nan_advice: Callable[[int], str] = lambda step: "lower the learning rate"


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the checkpoint in `run_dir`; None without one. One written before this trainer (format 1,
    SoCo's `opt.{i}` or healing's `heal_checkpoint.json`) is refused in one line."""
    if (run_dir / "heal_checkpoint.json").is_file():
        raise SocoError(f"{run_dir} holds a healing checkpoint of an older soco-llm (heal_checkpoint.json), which "
                        f"this version cannot continue; delete the folder (rm -r {run_dir}) to heal from the start")
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SocoError(f"{path} is not valid JSON ({str(e).splitlines()[0]}): the checkpoint is damaged; delete "
                        f"{path.name} and {CHECKPOINT_TENSORS} to train from the start") from None
    step = meta.get("step") if isinstance(meta, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise SocoError(f"{path} holds no valid step; delete {path.name} and {CHECKPOINT_TENSORS} to train from "
                        "the start")
    if meta.get("format") != FORMAT:
        raise SocoError(f"the checkpoint in {run_dir} was written by an older soco-llm (before its one trainer) and "
                        f"cannot be continued; delete {path.name} and {CHECKPOINT_TENSORS} there to train from the "
                        "start (a run folder's cached basis and teacher are kept)")
    return step


def save_checkpoint(run_dir: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                    history: list[dict], settings: dict) -> None:
    """The trained tensors and their Adam state, keyed by name; then the step (the JSON last: it commits)."""
    tensors = {f"param.{name}": p.detach() for name, p in params.items()}
    for name, p in params.items():
        for key, value in opt.state.get(p, {}).items():
            if key in ADAM_STATE:
                tensors[f"adam.{name}.{key}"] = torch.as_tensor(value).reshape(-1) if key == "step" else value
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(run_dir / CHECKPOINT_TENSORS, tensors)
    atomic_write_json(run_dir / CHECKPOINT_FILE, {"format": FORMAT, "step": step, "history": history,
                                                  "settings": settings})


@torch.no_grad()
def load_checkpoint(run_dir: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                    settings: dict) -> tuple[int, list[dict]]:
    step = checkpoint_step(run_dir)
    meta = json.loads((run_dir / CHECKPOINT_FILE).read_text())
    differ = {k: v for k, v in meta.get("settings", {}).items() if settings.get(k) != v}
    if differ:
        shown = ", ".join(f"{k} {v!r}, not {settings.get(k)!r}" for k, v in differ.items())
        raise SocoError(f"the checkpoint in {run_dir} trained with {shown}; resume with those settings, or delete "
                        f"{CHECKPOINT_FILE} and {CHECKPOINT_TENSORS} to train from the start")
    try:
        t = load_file(str(run_dir / CHECKPOINT_TENSORS))
    except Exception as e:  # a damaged checkpoint: say which and what to do
        raise SocoError(f"the checkpoint in {run_dir} is damaged ({str(e).splitlines()[0]}); delete "
                        f"{CHECKPOINT_FILE} and {CHECKPOINT_TENSORS} to train from the start") from None
    for name, p in params.items():
        saved = t.get(f"param.{name}")
        if saved is None or saved.shape != p.shape:
            raise SocoError(f"the checkpoint in {run_dir} is for another model ({name}); delete it or choose another "
                            "run folder")
        p.copy_(saved)
        if f"adam.{name}.exp_avg" in t:
            opt.state[p] = {"step": t[f"adam.{name}.step"].reshape(()).clone(),
                            "exp_avg": t[f"adam.{name}.exp_avg"].to(p.device).clone(),
                            "exp_avg_sq": t[f"adam.{name}.exp_avg_sq"].to(p.device).clone()}
    return step, meta.get("history", [])


def train(params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, step_fn: Step, run: Run) -> list[dict]:
    """Run `step_fn`'s loss for run.steps steps over `params` with `opt`, from the checkpoint when resuming;
    returns the history (one record per step, the step's numbers read from the device once per checkpoint)."""
    rank, size = world()
    start, history = 0, []
    if run.resume and run.run_dir is not None and checkpoint_step(run.run_dir) is not None:
        start, history = load_checkpoint(run.run_dir, params, opt, run.settings)
        log.info("resumed from step %d in %s", start, run.run_dir)
    saves = run.run_dir is not None and rank == 0
    pending: list[tuple[int, dict]] = []
    bar = tqdm(range(start, run.steps), desc=run.desc, initial=start, total=run.steps, disable=rank != 0)

    def flush() -> None:
        """Read the pending steps' numbers in one sync; a non-finite loss raises before anything is saved."""
        tensors = [v for _, m in pending for v in m.values() if isinstance(v, torch.Tensor)]
        values = iter(torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist() if tensors else [])
        for step, metrics in pending:
            record = {k: next(values) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
            if not record.pop("finite"):
                raise SocoError(f"the loss became NaN/inf at step {step + 1}; {run.nan_advice(step + 1)}")
            history.append({"step": step + 1, **record})
        pending.clear()
        if history:
            bar.set_postfix({k: f"{v:.3g}" if isinstance(v, float) else v for k, v in history[-1].items() if k != "step"})

    def kept() -> str | None:
        flush()  # raises instead if a NaN came since the last checkpoint: then that one is the last good state
        if saves and history and history[-1]["step"] > start:
            save_checkpoint(run.run_dir, history[-1]["step"], params, opt, history, run.settings)
        step = checkpoint_step(run.run_dir) if run.run_dir is not None else None
        return None if step is None else f"{run.label or run.run_dir} keeps the checkpoint at step {step} of {run.steps}"

    with on_interrupt(kept):
        for step in bar:
            loss, metrics = step_fn(step, torch.Generator().manual_seed(run.seed * 1_000_003 + run.stream + step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if size > 1:
                for p in params.values():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= size
            opt.step()
            pending.append((step, {**metrics, "finite": torch.isfinite(loss.detach())}))
            if (step + 1) % run.checkpoint_every == 0 or step + 1 == run.steps:
                flush()
                if saves:
                    save_checkpoint(run.run_dir, step + 1, params, opt, history, run.settings)
    return history
