"""SoCo one decoder block at a time: bounded memory, for models whose factors do not fit at once.

The whole-model run holds every layer's full-rank factors (about 2× the weights) and
back-propagates through the whole model. Here each decoder block in turn is decomposed,
trained against the dense block's outputs on the calibration windows, cut and frozen; the
next block then sees the compressed block's outputs (sequential), so it also learns to
correct them. Only one block's factors, scores and activations exist at a time.

What it trades: the loss is the block's normalised output error, not the KL of the whole
model; and every block is cut at the target ratio on its own (ranks still move between the
linears of a block, not between blocks), so `soco export` at other ratios is not offered.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...core.adapter import Target
from ...core.budget import LayerRank
from ...core.stats import BlockRunner, block_output
from ...errors import SocoError
from ...io.read import read_tensors
from .basis import basis_entry
from .config import SoCoConfig
from ...learned.cut import cut
from ...learned.run_folder import SCORES_FILE, restore_trained, save_tensors, trained_tensors
from ...learned.run_state import start_over
from ...learned.spectral import GateState, install_spectral
from ...core.teacher import BatchLoss
from .train import freeze, train_scores


def block_loss(block: nn.Module, inputs: list[tuple[tuple, dict]], outputs: list[torch.Tensor]) -> BatchLoss:
    """Output error of the student block on one captured batch, relative to the dense output's energy."""

    def loss(gen: torch.Generator, _rank: int, _world: int) -> torch.Tensor:
        j = int(torch.randint(0, len(inputs), (1,), generator=gen))
        args, kwargs = inputs[j]
        y, t = block_output(block(*args, **kwargs)).float(), outputs[j].float()
        return (y - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
    return loss


def compress_blockwise(model: nn.Module, cfg: SoCoConfig, windows: torch.Tensor, targets: list[Target],
                       run_dir: Path | None) -> tuple[list[LayerRank], dict, list[dict]]:
    """Train and cut `model` block by block, in place; `cfg.steps` steps per block: (rows, trained tensors, history)."""
    freeze(model)
    rows, final, history = [], {}, []
    runner = BlockRunner(model, targets, list(windows.split(cfg.batch_size)))

    def on_block(i: int, block: nn.Module, stats: dict) -> None:
        block_targets = [t for t in targets if t.block == i]
        if not block_targets:
            return
        gate = GateState()
        layers = install_spectral(model, block_targets, {t.name: basis_entry(t, cfg, stats.get(t.name))
                                                         for t in block_targets}, gate)
        done = f"block-{i:04d}.safetensors"
        if run_dir is not None and cfg.resume and (run_dir / done).is_file():  # trained before an interruption
            restore_trained(layers, read_tensors(run_dir / done, start_over(run_dir)))
        else:
            with torch.enable_grad():
                loss = block_loss(block, runner.block_inputs, runner.block_outputs)
                hist = train_scores(layers, gate, loss, cfg, None, desc=f"soco block {i}")
            history.extend({**h, "block": i} for h in hist)
            save_tensors(run_dir, done, trained_tensors(layers))
        final.update(trained_tensors(layers))
        rows.extend(cut(model, layers, cfg.ratio, cfg.deviation, cfg.rank_multiple))

    runner.run(on_block, {"xtx"} if cfg.basis == "whitened" else set(), sequential=True, desc="soco blocks")
    if not rows:
        raise SocoError("no target linears were found in the decoder blocks")
    save_tensors(run_dir, SCORES_FILE, final)
    return rows, final, history
