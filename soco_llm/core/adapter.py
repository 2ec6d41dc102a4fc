"""Model adapter: find the decoder blocks and their linear layers from the module tree alone, and swap
modules in place (the one surgery primitive every method uses).

No per-architecture tables. The decoder stack is the longest `nn.ModuleList` of identical
blocks that contain linears; targets are the `nn.Linear` / GPT-2 `Conv1D` modules inside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import SocoError
from .layer import LowRankLinear


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def factor_names(model: nn.Module) -> set[str]:
    """Names of the `nn.Linear` factors inside compressed layers (`x.A`, `x.B`): linears, but not layers of
    the model's architecture, so never targets of a method or of a dense merge."""
    return {f"{name}.{f}" for name, m in model.named_modules() if isinstance(m, LowRankLinear) for f in ("A", "B")}


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); Conv1D stores it transposed."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features m, in_features n)."""
    w = linear_weight(module)
    return int(w.shape[0]), int(w.shape[1])


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and ModuleList of the decoder blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise SocoError(
            f"{type(model).__name__} has no stack of decoder blocks with linear layers; "
            "soco-llm compresses transformer decoders (Llama, Qwen, Mistral, Gemma, OPT, GPT-2 style)"
        )
    return best


def _matches(name: str, patterns: list[str]) -> bool:
    # A pattern matches a whole dotted suffix: "q_proj", "mlp.*", "self_attn\.(q|k)_proj", or a full name.
    return any(re.fullmatch(rf"(.*\.)?(?:{p})", name) for p in patterns)


@dataclass
class Target:
    name: str  # full module name in the model
    block: int  # index of the decoder block
    module: nn.Module

    @property
    def shape(self) -> tuple[int, int]:
        return linear_shape(self.module)


def find_targets(
    model: nn.Module,
    target_modules: list[str] | None = None,
    exclude_modules: list[str] | None = None,
) -> list[Target]:
    """Linear layers inside the decoder blocks, selected like peft's target/exclude_modules."""
    prefix, blocks = decoder_blocks(model)
    factors = factor_names(blocks)
    targets = []
    for i, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if not is_linear(module) or f"{i}.{sub}" in factors:
                continue
            name = f"{prefix}.{i}.{sub}"
            if target_modules and not _matches(name, target_modules):
                continue
            if exclude_modules and _matches(name, exclude_modules):
                continue
            targets.append(Target(name, i, module))
    if not targets:
        raise SocoError(
            "no target linear layers found in the decoder blocks"
            + (f" for target_modules={target_modules}" if target_modules else "")
            + (f" excluding {exclude_modules}" if exclude_modules else "")
            + "; check the module names with `print(model)`"
        )
    return targets


def saved_linear(model: nn.Module, name: str, kind: str, where: str) -> nn.Module:
    """The linear layer `name` of `model`, where a saved folder's config.json names a `kind` (compressed,
    quantized) layer; a name that is not a linear layer of the model means the folder is corrupt."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not is_linear(module):
        raise SocoError(f"{where}: {kind} layer {name!r} is not a linear layer of {type(model).__name__}; "
                        "the folder is corrupt, re-create it")
    return module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap a submodule in place (setattr on its parent), as peft does."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
