"""Turning a compressed model back into an ordinary dense one that plain transformers loads exactly.

Merging W = B·A is the easy part (`LowRankLinear.to_dense`). The dense architecture must also build a
bias wherever a merged layer has one (SoCo's trained bias d sits on layers whose architecture has
none): otherwise transformers drops every such `*.bias` as unexpected, silently. The config switches
that add biases are found by building the architecture on the meta device with each candidate switch
(any False config flag with "bias" in its name) turned on, so no per-model table is needed. A nonzero
bias that no switch can give its layer is an error; a dense folder never loses weights.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..core.adapter import factor_names, is_linear, replace_module
from ..core.layer import LowRankLinear
from ..errors import SocoError, first_line
from .format import FORMAT_KEYS, WEIGHTS, check_against_model, read_shapes

log = logging.getLogger(__name__)



def _meta_shapes(cls: type, config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(t.shape) for k, t in cls(config).state_dict().items()}


def _built_biases(shapes: dict, linears: set[str]) -> set[str]:
    return {k[: -len(".bias")] for k in shapes if k.endswith(".bias") and k[: -len(".bias")] in linears}


def _bias_switches(model: nn.Module, biases: dict[str, torch.Tensor],
                   linears: set[str]) -> tuple[dict, set[str], set[str]]:
    """({config switch: True} that make the architecture build a bias for every layer in `biases`,
    the layers whose bias is zero and that no switch reaches, so dropping it loses nothing,
    the layers that the architecture so switched builds with a bias)."""
    cls, config = type(model), copy.deepcopy(model.config)
    shapes = _meta_shapes(cls, config)
    built = _built_biases(shapes, linears)
    switches: dict[str, bool] = {}
    for key, value in config.to_dict().items():
        if not set(biases) - built:
            break
        if value is not False or "bias" not in key.lower():
            continue
        trial = copy.deepcopy(config)
        setattr(trial, key, True)
        try:
            trial_shapes = _meta_shapes(cls, trial)
        except Exception:  # a flag this architecture cannot build with: not a bias switch
            continue
        added = set(trial_shapes) - set(shapes)
        # Only a switch that adds biases and changes nothing else; one that does more is not ours to flip.
        if (any(trial_shapes.get(k) != s for k, s in shapes.items()) or not all(k.endswith(".bias") for k in added)
                or not (_built_biases(trial_shapes, linears) - built) & set(biases)):
            continue
        config, shapes, built, switches[key] = trial, trial_shapes, _built_biases(trial_shapes, linears), True
    unreached = set(biases) - built
    lost = sorted(n for n in unreached if torch.count_nonzero(biases[n]))
    if lost:
        raise SocoError(
            f"export-dense: {cls.__name__} (model_type {getattr(config, 'model_type', '?')!r}) has no config switch "
            f"that gives {lost[0]} a bias ({len(lost)} such layer(s)), so a dense folder would lose their biases "
            "(SoCo's trained bias d); keep the compressed folder and load it with soco_llm.load, or compress "
            "without the added bias (--set deviation=false)")
    return switches, unreached, built


@torch.no_grad()
def merge_to_dense(model: nn.Module) -> nn.Module:
    """Replace every LowRankLinear by the dense module it came from (W = B·A), in place, and set the config's
    bias switches so the architecture builds every bias the merged layers hold (others get zero biases).
    SocoError, with the model unchanged, if some nonzero bias has no switch."""
    dense = {name: m.to_dense() for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    factors = factor_names(model)
    merged = {name: dense.get(name, m) for name, m in model.named_modules() if name not in factors}
    linears = {name for name, m in merged.items() if is_linear(m)}
    biases = {name: merged[name].bias for name in linears if merged[name].bias is not None}
    switches, drop, built = _bias_switches(model, biases, linears)
    for name, m in dense.items():
        replace_module(model, name, m)
    for key, value in switches.items():
        log.info("dense config: %s = %s, so the merged layers keep their biases", key, value)
        setattr(model.config, key, value)
    for name in linears:
        layer = model.get_submodule(name)
        if name in drop:
            layer.bias = None  # all zeros, and the architecture has no place for it
        elif name in built and layer.bias is None:  # a switch covers a group of layers; zero is exact
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype,
                                                  device=layer.weight.device),
                                      requires_grad=layer.weight.requires_grad)
    for k in FORMAT_KEYS:
        if hasattr(model.config, k):
            delattr(model.config, k)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    return model


def check_dense_folder(folder: Path, where: str) -> None:
    """The dense folder loads exactly with plain transformers: the architecture built (on the meta device)
    from its own config.json takes exactly the tensors saved, none missing, none dropped."""
    try:
        config = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise SocoError(f"{where}: transformers could not build the dense model from its config.json "
                        f"({first_line(e)}); "
                        "nothing was written") from e
    check_against_model(model, read_shapes([folder / WEIGHTS]), where)
