"""The block-sequential pipeline's model: decoder blocks read one at a time from a checkpoint's safetensors,
memory-mapped, so the dense model is never in memory whole.

`open_streamed(folder)` builds the model with every decoder-block parameter on the meta device and everything
else (embeddings, final norm, output head, all buffers) read from the folder's files. Its `BlockSource`
(`model.block_source`) is what `stats.BlockRunner` asks: it reads block i's tensors just before the runner
processes that block and, once the block's stage is done, drops the dense layers the stage replaced (a
compressed block keeps only its own, smaller, tensors). So a block-wise method (SoCo with `blockwise=True`)
run through `compress()` on such a model holds one dense block at a time, whatever the depth; the result is
an ordinary compressed model to save.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import SocoError
from .adapter import decoder_blocks


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


class BlockSource:
    """Reads one decoder block's tensors at a time from memory-mapped safetensors files."""

    def __init__(self, model: nn.Module, files: dict[str, Path], dtype: torch.dtype, device: torch.device):
        self.model = model
        self.files = files  # tensor name -> file holding it
        self.dtype = dtype
        self.device = device
        self.prefix, self.blocks = decoder_blocks(model)
        self.read: list[int] = []  # the blocks read, in order (each once)
        self._dense: dict[int, list[nn.Module]] = {}

    def tensor(self, name: str) -> torch.Tensor:
        with safe_open(str(self.files[name]), "pt") as f:  # memory-mapped: only this tensor's pages are read
            t = f.get_tensor(name)
        return (t.to(self.dtype) if t.is_floating_point() else t).to(self.device)

    def load(self, i: int) -> None:
        """Block i's parameters, read from the files into the model."""
        block = self.blocks[i]
        for name, _ in list(block.named_parameters()):
            _set_param(block, name, self.tensor(f"{self.prefix}.{i}.{name}"))
        self._dense[i] = list(block.modules())
        self.read.append(i)

    def release(self, i: int) -> None:
        """Drop the tensors of block i's modules that its stage replaced (they are no longer in the block)."""
        kept = {id(m) for m in self.blocks[i].modules()}
        for module in self._dense.pop(i, []):
            if id(module) not in kept:
                module.to("meta")


def _weight_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise SocoError(f"{str(folder)!r} holds no model.safetensors (or its index); the block-sequential pipeline "
                        "reads a dense model folder's safetensors")
    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def open_streamed_with_tokenizer(folder: str | os.PathLike, dtype: torch.dtype | None = None,
                                 device: str | torch.device = "cpu"):
    """(`open_streamed(folder)`, the folder's tokenizer): what the CLI's block-sequential pipeline loads."""
    from transformers import AutoTokenizer

    model = open_streamed(folder, dtype or torch.float32, device)
    return model, AutoTokenizer.from_pretrained(str(folder))


def open_streamed(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> nn.Module:
    """The model of a dense folder with its decoder blocks left on the meta device, to be read one at a time
    onto `device` (`model.block_source`); everything outside the blocks is read now."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SocoError(f"{str(folder)!r} is not a model folder (no config.json); the block-sequential pipeline reads "
                        "a dense Hugging Face folder's safetensors")
    files = _weight_files(folder)
    config = AutoConfig.from_pretrained(str(folder))
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for module in model.modules():  # the buffers (rotary tables) onto the device; parameters stay on meta until read
        module._buffers.update({k: b.to(device) for k, b in module._buffers.items() if b is not None})
    source = BlockSource(model, files, dtype, torch.device(device))
    for name, _ in list(model.named_parameters()):
        if name.startswith(source.prefix + "."):
            continue
        if name not in files:
            if getattr(config, "tie_word_embeddings", False):
                continue  # the head shares the embedding: tied below
            raise SocoError(f"{str(folder)!r} has no tensor {name}; is it a dense model folder?")
        _set_param(model, name, source.tensor(name))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.name_or_path = str(folder)
    model.block_source = source
    return model.eval()
