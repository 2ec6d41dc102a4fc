"""Rebuilding a saved soco-llm model by explicit surgery, the one path every saved format loads by: the
architecture is built from config.json with its weights on the meta device (buffers such as rotary tables
are computed as usual), the compressed layers (`compression.ranks`) and quantized layers
(`compression.quantization`) are put in place, and then every saved tensor must match the rebuilt model
exactly (missing, unexpected or mis-shaped is an error) before it is assigned. `check_folder` makes the same
check against the meta-device model alone, for `soco info` and every load, before any tensor is read.

Formats 1 and 2 stored a compressed layer's factors as bare parameters `x.A`, `x.B` and its bias as
`x.bias`; since format 3 the factors are `nn.Linear` modules (`x.A.weight`, `x.B.weight`, `x.B.bias`).
`current_names` maps the old names to the new ones.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ..core.adapter import linear_shape, replace_module, saved_linear
from ..core.layer import LowRankLinear
from ..errors import SocoError, first_line
from ..quantize import rebuild_quantized
from .format import (FORMAT_KEYS, read_config, check_against_model, check_compression, check_weights,
                     read_shapes, weights_file)

log = logging.getLogger(__name__)


def current_names(comp: dict, names) -> dict[str, str]:
    """{saved name: name in today's model} for the tensors of a folder of format `comp['format_version']`."""
    if comp["format_version"] >= 3:
        return {n: n for n in names}
    compressed = {n for n, r in comp["ranks"].items() if r > 0}
    renamed = {}
    for n in names:
        layer, _, leaf = n.rpartition(".")
        if layer in compressed:
            n_new = {"A": f"{layer}.A.weight", "B": f"{layer}.B.weight", "bias": f"{layer}.B.bias"}.get(leaf, n)
        else:
            n_new = n
        renamed[n] = n_new
    return renamed


def _architecture(folder: Path, where: str, dtype: torch.dtype | None, device: str) -> nn.Module:
    """The dense architecture from config.json (without the format's entries), weights on the meta device;
    with `device="meta"` its buffers too."""
    try:
        config = AutoConfig.from_pretrained(str(folder))
        for k in FORMAT_KEYS:  # the compression section stays: the loaded model carries it, as before format 3
            if k != "compression" and hasattr(config, k):
                delattr(config, k)
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if device == "meta":
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, dtype=dtype)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except SocoError:
        raise
    except Exception as e:
        raise SocoError(f"{where}: transformers could not build the model from its config.json "
                        f"({first_line(e)}); "
                        "the folder is damaged, re-create it") from e


def rebuild(folder: Path, comp: dict, where: str, dtype: torch.dtype | None = None,
            device: str = "cpu") -> nn.Module:
    """The saved model's structure, every weight on the meta device (`device`="meta": the buffers too)."""
    model = _architecture(folder, where, dtype, device)
    biased = set(comp.get("biased", []))
    for name, rank in comp["ranks"].items():
        if rank == 0:
            continue  # left dense
        old = saved_linear(model, name, "compressed", where)
        m, n = linear_shape(old)
        replace_module(model, name, LowRankLinear(n, m, rank, bias=name in biased, dtype=old.weight.dtype,
                                                  device=old.weight.device, dense_cls=type(old)))
    if comp.get("quantization"):
        rebuild_quantized(model, comp["quantization"], where)
    return model


def check_tensors(folder: Path, comp: dict, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The saved tensors (`shapes`, by saved name) are exactly those of the rebuilt model."""
    renamed = current_names(comp, shapes)
    check_against_model(rebuild(folder, comp, where, device="meta"), {renamed[k]: s for k, s in shapes.items()},
                        where)


def load_weights(model: nn.Module, folder: Path, comp: dict, where: str) -> nn.Module:
    """Assign the folder's tensors to the rebuilt `model`; re-tie tied weights; nothing may stay on meta."""
    weights = weights_file(folder, comp)
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise SocoError(f"{weights} is corrupt or truncated ({str(e).splitlines()[0]}); "
                        "re-create the folder") from e
    renamed = current_names(comp, tensors)
    # A tensor read from the file may start at any byte; PyTorch's packed int8 / int4 CPU kernels read with
    # aligned vector loads and crash (segfault) on a misaligned weight, so those get memory of their own.
    tensors = {renamed[k]: v if v.data_ptr() % 64 == 0 else v.clone() for k, v in tensors.items()}
    check_against_model(model, {k: tuple(v.shape) for k, v in tensors.items()}, where)
    expected = model.state_dict()
    for k, v in tensors.items():  # a float where integers belong (or the reverse) is damage, not a cast
        if k in expected and v.is_floating_point() != expected[k].is_floating_point() or \
                not v.is_floating_point() and v.dtype != expected[k].dtype:
            raise SocoError(f"{where}: {k} is stored as {v.dtype}, not {expected[k].dtype}; the folder is corrupt, "
                            "re-create it")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise SocoError(f"{where}: {len(left)} tensor(s) of the model were not in the weights (first: {left[0]}); "
                        "the folder is incomplete, re-create it")
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(folder))
        except Exception as e:  # generation settings are not weights: load without them, say so
            log.warning("%s: generation_config.json not read (%s)", where, str(e).splitlines()[0])
    return model


def check_folder(folder: str | os.PathLike) -> dict:
    """Validate a saved folder without loading its weights, for `soco info` and `soco_llm.load`:
    config.json (the compression section), every safetensors header, and every tensor against the model
    rebuilt on the meta device (none missing, none unexpected, every shape equal). Returns the compression
    section; raises SocoError (one line)."""
    folder = Path(folder)
    where = repr(str(folder))
    cfg = read_config(folder)
    comp = check_compression(cfg.get("compression"), where)
    check_weights(folder)
    weights = weights_file(folder, comp)
    if not weights.is_file():
        raise SocoError(f"{where} has no {weights.name}; the folder is incomplete, re-create it")
    check_tensors(folder, comp, read_shapes([weights]), where)
    return comp
