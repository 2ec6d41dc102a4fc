"""Quantizing a whole model, dense or compressed, with one code path: every linear inside the decoder blocks
(the dense layers and the `nn.Linear` factors of compressed layers) becomes a `QuantizedLinear`; embeddings,
the LM head and norms stay as they are. Also: the rank multiple a layout needs, the one-line check that every
layer fits the layout (before any heavy work), and rebuilding the quantized structure when a folder loads.
"""

from __future__ import annotations

import logging

from torch import nn

from ..core.adapter import decoder_blocks, is_linear, linear_shape, replace_module, saved_linear
from ..core.layer import LowRankLinear
from ..errors import SocoError
from .linear import GROUP_SIZES, OUT_MULTIPLE, SCHEMES, QuantizedLinear

log = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 64


def check_scheme(scheme: str | None, group_size: int | None) -> tuple[str | None, int | None]:
    """(scheme or None for "none", group size for int4 else None); a bad pair fails in one line."""
    if scheme in (None, "none"):
        return None, None
    if scheme not in SCHEMES:
        raise SocoError(f"unknown --quantize {scheme!r}; choose none, {' or '.join(SCHEMES)}")
    if scheme == "int8":
        return scheme, None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise SocoError(f"--group-size {group_size} is not one the int4 kernels take; choose one of "
                        f"{', '.join(map(str, GROUP_SIZES))}")
    return scheme, group_size


def rank_multiple(scheme: str | None, group_size: int | None) -> int:
    """The multiple every rank must be for `scheme`. int4 factors A (in → rank) take the rank as their output
    width, which the CPU layout needs a multiple of 16; factors B (rank → out) take it as their grouped input
    width, padded with zero columns up to the group where it is not a multiple (exact; the padding's bytes
    are counted in the folder). Rounding to 16 rather than to the group keeps SVD-family layers near their
    share of the budget (SmolLM2's q_proj at 0.4: 160 against 128 when rounded to 64). int8 and none take any
    rank."""
    return OUT_MULTIPLE if scheme == "int4" else 1


def target_names(model: nn.Module) -> list[str]:
    """Every linear inside the decoder blocks: dense layers and the A / B factors of compressed layers
    (themselves `nn.Linear`)."""
    prefix, blocks = decoder_blocks(model)
    return [f"{prefix}.{i}.{sub}" for i, block in enumerate(blocks) for sub, m in block.named_modules()
            if is_linear(m)]


def check_layout(shapes: dict[str, tuple[int, int]], scheme: str | None, group_size: int | None,
                 ranks: dict[str, int] | None = None) -> None:
    """Every layer (name: (out, in)) fits the layout, else one line naming the first that does not and the fix.
    `ranks` (compressed layers' ranks) names the rank as the culprit where a factor does not fit."""
    if scheme != "int4":
        return
    for name, (out_f, _in_f) in shapes.items():
        if out_f % OUT_MULTIPLE:
            layer, _, factor = name.rpartition(".")
            if ranks and factor in ("A", "B") and layer in ranks:
                raise SocoError(f"--quantize int4: {layer} has rank {ranks[layer]}, which no int4 layout takes (the "
                                f"rank must be a multiple of {OUT_MULTIPLE}); compress with --quantize int4 (ranks "
                                f"rounded to {OUT_MULTIPLE}; a layer too small for that keeps its rank), leave "
                                "the layer dense (--exclude-modules), or use --quantize int8")
            raise SocoError(f"--quantize int4: {name} has {out_f} outputs, which no int4 layout takes (a multiple "
                            f"of {OUT_MULTIPLE} is needed); use --quantize int8")


def quantize_model(model: nn.Module, scheme: str | None, group_size: int | None = None) -> list[str]:
    """Replace every decoder linear (`target_names`) by a `QuantizedLinear`, in place; returns their names.
    The layout is checked for all layers first, so a layer that does not fit changes nothing."""
    scheme, group_size = check_scheme(scheme, group_size)
    if scheme is None:
        return []
    names = [n for n in target_names(model) if not isinstance(model.get_submodule(n), QuantizedLinear)]
    shapes = {n: linear_shape(model.get_submodule(n)) for n in names}
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    check_layout(shapes, scheme, group_size, ranks)
    for n in names:
        replace_module(model, n, QuantizedLinear.from_linear(model.get_submodule(n), scheme, group_size))
    log.info("quantized %d decoder linears to %s%s", len(names), scheme, f" (group {group_size})" if group_size else "")
    return names


def quantization_section(model: nn.Module) -> dict | None:
    """What config.json records of a quantized model: scheme, group size and the quantized layers."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        return None
    schemes = {(m.scheme, m.group_size) for m in layers.values()}
    if len(schemes) != 1:
        raise SocoError("the model mixes quantization schemes, which the saved format does not record; "
                        "quantize it with one scheme")
    (scheme, group_size), = schemes
    return {"scheme": scheme, "group_size": group_size, "layers": sorted(layers)}


def rebuild_quantized(model: nn.Module, section: dict, where: str) -> None:
    """Put empty `QuantizedLinear` layers (on the linears' device, usually meta) where config.json says the
    model was quantized, for the saved tensors to fill."""
    scheme, group_size = section.get("scheme"), section.get("group_size")
    layers = section.get("layers")
    try:
        check_scheme(scheme, group_size)
    except SocoError as e:
        raise SocoError(f"{where}: config.json's compression.quantization is invalid ({e}); the folder is "
                        "corrupt, re-create it") from None
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise SocoError(f"{where}: compression.quantization.layers must be a list of layer names; the folder is "
                        "corrupt, re-create it")
    for name in layers:
        old = saved_linear(model, name, "quantized", where)
        out_f, in_f = linear_shape(old)
        w = old.weight
        replace_module(model, name, QuantizedLinear(in_f, out_f, scheme, group_size, getattr(old, "bias", None)
                                                    is not None, w.dtype, w.device))
