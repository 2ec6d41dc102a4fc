"""Calibration statistics, collected with forward hooks one decoder block at a time.

`BlockRunner` captures the inputs of the first decoder block once, then walks the stack:
run block i on its inputs with hooks on its target linears, hand the statistics to a callback
(which may compress the block), and feed the outputs to block i+1. Peak memory is one block's
activations over the calibration set, independent of depth; a model opened by `streamed.open_streamed`
has each block read from disk just before its turn and its replaced layers dropped after (`block_source`),
so the dense model is never in memory whole. Fisher information needs the
LM loss, so it is the one statistic collected with a whole-model backward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SocoError
from .adapter import Target, decoder_blocks, linear_weight

log = logging.getLogger(__name__)


# Statistics gathered from a layer's inputs during a block's forward pass (Fisher needs a backward pass).
ACTIVATION_KINDS = frozenset({"xtx", "abs_mean"})


@dataclass
class LayerStats:
    """Running statistics of one linear layer's inputs."""

    xtx: torch.Tensor | None = None  # Σ xᵀx, fp64 (n×n)
    abs_sum: torch.Tensor | None = None  # Σ |x| per input channel, fp64
    rows: int = 0
    fisher_rows: torch.Tensor | None = None  # Σ grad² per output row, fp64

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)


class _StopForward(Exception):
    pass


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """Run the model up to the first decoder block and keep that block's (args, kwargs) per batch."""
    _, blocks = decoder_blocks(model)
    captured: list[tuple[tuple, dict]] = []

    def grab(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def nonfinite_weight(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or inf, None when all are finite."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            return name
    return None


def nonfinite_inputs_error(model: nn.Module, where: str, dtype: torch.dtype) -> SocoError:
    """Why a layer (or the loss) saw NaN or inf, most likely cause first: broken weights, then the dtype, then
    the data."""
    bad = nonfinite_weight(model)
    if bad is not None:
        return SocoError(f"NaN or inf in {where}: the model's weight {bad} holds NaN or inf, so its "
                         "files are broken; re-create or re-download the model")
    if dtype != torch.float32:
        return SocoError(f"NaN or inf in {where}; the model is unstable in {str(dtype).split('.')[-1]} "
                         "(try --dtype float32)")
    return SocoError(f"NaN or inf in {where}: the weights are finite but the activations overflow even "
                     "in float32; check the model's weights (some may be huge) and the calibration text (--calib)")


class _InputStats:
    """Forward hook that accumulates XᵀX and Σ|x|; layers fed the same tensor share the work."""

    def __init__(self, targets: list[Target], kinds: set[str], model: nn.Module):
        self.model = model  # only to say why, when an input is NaN
        self.stats = {t.name: LayerStats() for t in targets}
        self.kinds = kinds
        self._memo: dict[tuple, tuple] = {}
        self.handles = [t.module.register_forward_hook(self._hook(t.name)) for t in targets]

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            x = inputs[0]
            key = (x.data_ptr(), tuple(x.shape))
            if key not in self._memo:
                x2 = x.reshape(-1, x.shape[-1]).float()
                if not torch.isfinite(x2).all():
                    raise nonfinite_inputs_error(self.model, f"the inputs of {name}", x.dtype)
                # One batch's product in fp32 (4-8x faster on CPU), accumulated across batches in fp64.
                xtx = (x2.T @ x2).double() if "xtx" in self.kinds else None
                abs_sum = x2.abs().sum(0, dtype=torch.float64) if "abs_mean" in self.kinds else None
                # Holding x keeps its address from being reused by a later, different input.
                self._memo[key] = (x, xtx, abs_sum, x2.shape[0])
            _, xtx, abs_sum, rows = self._memo[key]
            s = self.stats[name]
            if xtx is not None:
                s.xtx = xtx.clone() if s.xtx is None else s.xtx.add_(xtx)
            if abs_sum is not None:
                s.abs_sum = abs_sum.clone() if s.abs_sum is None else s.abs_sum.add_(abs_sum)
            s.rows += rows
        return hook

    def next_call(self):
        self._memo.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


BlockCallback = Callable[[int, nn.Module, dict[str, LayerStats]], None]


class BlockRunner:
    """Walks the decoder blocks over calibration batches, one block at a time."""

    def __init__(self, model: nn.Module, targets: list[Target], batches: list[torch.Tensor]):
        self.model = model
        self.targets = targets
        self.batches = batches
        self.block_inputs: list[tuple[tuple, dict]] = []  # (args, kwargs) of the current block, per batch
        self.block_outputs: list[torch.Tensor] = []  # its outputs before on_block changes it

    @torch.no_grad()
    def run(self, on_block: BlockCallback, kinds: set[str], sequential: bool = False, desc: str = "blocks") -> None:
        _, blocks = decoder_blocks(self.model)
        source = getattr(self.model, "block_source", None)  # blocks read one at a time (streamed.py)
        inputs = capture_block_inputs(self.model, self.batches)
        for i, block in enumerate(tqdm(blocks, desc=desc)):
            if source is not None:
                source.load(i)
            targets = [t for t in self.targets if t.block == i]
            collector = _InputStats(targets, kinds, self.model)
            outputs = []
            try:
                for args, kwargs in inputs:
                    collector.next_call()
                    outputs.append(block_output(block(*args, **kwargs)))
            finally:
                collector.remove()
            # What a block-wise trainer needs besides the statistics: this block's inputs and outputs.
            self.block_inputs, self.block_outputs = inputs, outputs
            on_block(i, block, collector.stats)
            if sequential:  # the next block sees what the compressed block produces
                outputs = [block_output(block(*args, **kwargs)) for args, kwargs in inputs]
            inputs = [_with_hidden(a, k, h) for (a, k), h in zip(inputs, outputs)]
            if source is not None:
                source.release(i)


def collect_fisher(model: nn.Module, targets: list[Target], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Σ over batches of squared LM-loss gradients, summed per output row (FWSVD's row weights)."""
    device = next(model.parameters()).device
    # fp64 sums on each layer's own device: no copy to the host per backward pass
    fisher = {t.name: torch.zeros(t.shape[0], dtype=torch.float64, device=t.module.weight.device) for t in targets}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    for t in targets:
        w = t.module.weight
        w.requires_grad_(True)
        transposed = w is not linear_weight(t.module)

        def accumulate(param, name=t.name, transposed=transposed):
            g2 = param.grad.detach().double().pow(2)
            fisher[name] += g2.sum(0) if transposed else g2.sum(1)
            param.grad = None  # keep memory at one gradient at a time

        handles.append(w.register_post_accumulate_grad_hook(accumulate))
    # One window per backward: Fisher is the mean of per-sample squared gradients, and memory
    # stays at one window's activations and logits.
    windows = [w for batch in batches for w in batch.split(1)]
    try:
        for ids in tqdm(windows, desc="fisher"):
            ids = ids.to(device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise nonfinite_inputs_error(model, "the LM loss", next(model.parameters()).dtype)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
            p.grad = None
    return fisher
