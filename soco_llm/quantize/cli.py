"""The command line's quantization: `--quantize` / `--group-size` on `soco compress` and `soco export`, and
`soco quantize MODEL --out DIR`, which quantizes any folder (dense or compressed) with the same code, so the
dense-quantized baseline and the quantized compressed model are made alike. Every check runs before the
model is loaded."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..core.report import CompressionReport, model_params
from ..errors import SocoError
from ..runtime import DTYPE_CHOICES
from .linear import GROUP_SIZES, OUT_MULTIPLE
from .model import check_layout, check_scheme, quantize_model, rank_multiple, target_names


def add_quantize_args(p: argparse.ArgumentParser, default: str | None = "none") -> None:
    p.add_argument("--quantize", default=default, choices=["none", "int8", "int4"],
                   help="weight-only quantization of the decoder linears (the factors of compressed layers) "
                        "before saving: int8 per channel, int4 per group")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"int4 group size, one of {', '.join(map(str, GROUP_SIZES))} (default 64); with "
                        f"--quantize int4, compress rounds ranks to a multiple of {OUT_MULTIPLE}")


def add_quantize_parser(sub) -> None:
    q = sub.add_parser("quantize", help="quantize any model folder (dense or compressed) to int8 or int4 weights")
    q.add_argument("model", help="model folder, .gguf file or hub id (dense or compressed)")
    q.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="the dtype of the scales, of everything not quantized and of the activations (default: as "
                        "saved; bfloat16 runs the CPU kernels fastest)")
    add_quantize_args(q, default="int8")


def round_ranks(args, config) -> None:
    """compress: ranks rounded to what the layout needs (`config.rank_multiple`), checked before any work."""
    scheme, group_size = check_scheme(args.quantize, args.group_size)
    need = rank_multiple(scheme, group_size)
    if need > 1:
        config.rank_multiple = math.lcm(config.rank_multiple, need)


def check_run_ranks(args, cfg) -> None:
    """export: the run cuts ranks to multiples of `cfg.rank_multiple`; int4 needs multiples of OUT_MULTIPLE."""
    scheme, _ = check_scheme(args.quantize, args.group_size)
    if scheme == "int4" and cfg.rank_multiple % OUT_MULTIPLE:
        raise SocoError(f"--quantize int4: this run cuts ranks to multiples of {cfg.rank_multiple}, and int4 needs "
                        f"multiples of {OUT_MULTIPLE}; use --quantize int8, or train with --quantize int4 (which "
                        "rounds the ranks)")


def quantize_before_save(model, report, args) -> None:
    """compress / export: quantize the finished model (after healing), recorded in the report's config."""
    scheme, group_size = check_scheme(getattr(args, "quantize", None), getattr(args, "group_size", None))
    if scheme is not None:
        quantize_model(model, scheme, group_size)
        report.config["quantize"] = {"scheme": scheme, "group_size": group_size}


def _meta_shapes(spec: str, comp: dict | None) -> dict[str, tuple[int, int]]:
    """(out, in) of every layer quantizing would touch, from config.json alone (the model built on meta)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.adapter import linear_shape
    from ..io.rebuild import rebuild

    if comp is not None:
        model = rebuild(Path(spec), comp, repr(spec), device="meta")
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec))
    return {n: linear_shape(model.get_submodule(n)) for n in target_names(model)}


def quantize_folder(args, check_out, load_model) -> None:
    """`soco quantize MODEL --out DIR`: every input checked (scheme, output folder, each layer against the
    layout, from config.json alone), then the model is loaded, quantized and saved (format 3)."""
    from ..io import read_compression, save_compressed
    from ..models import _is_compressed

    scheme, group_size = check_scheme(args.quantize, args.group_size)
    if scheme is None:
        raise SocoError("soco quantize needs --quantize int8 or int4")
    check_out(args.out, args.overwrite, args.model)
    folder = Path(args.model)
    comp = read_compression(folder) if folder.is_dir() and _is_compressed(folder) else None
    if comp is not None and comp.get("quantization"):
        raise SocoError(f"{args.model!r} is quantized already ({comp['quantization']['scheme']}); quantize the "
                        "folder from before")
    if folder.is_dir():
        check_layout(_meta_shapes(args.model, comp), scheme, group_size, comp and comp["ranks"])
    model, tok = load_model(args.model, args.dtype, "cpu")
    names = quantize_model(model, scheme, group_size)
    config = dict(comp.get("config", {})) if comp else {}
    config["quantize"] = {"scheme": scheme, "group_size": group_size, "source": str(args.model)}
    ranks = comp["ranks"] if comp else {}
    report = CompressionReport(
        method=comp["method"] if comp else "dense", target_ratio=comp.get("target_ratio", 0.0) if comp else 0.0,
        achieved_ratio=comp.get("achieved_ratio", 0.0) if comp else 0.0,
        layers=[{"name": n, "rank": r} for n, r in ranks.items()], model_params_before=model_params(model),
        model_params_after=model_params(model), seconds=0.0, config=config)
    save_compressed(model, tok, args.out, report, overwrite=args.overwrite)
    print(f"quantized {len(names)} decoder linears to {scheme}{f' (group {group_size})' if group_size else ''}; "
          f"saved to {args.out}")
