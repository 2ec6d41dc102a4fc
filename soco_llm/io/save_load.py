"""Saving and loading model folders: safetensors + JSON only, written atomically, never over a folder unasked.

`save_compressed` writes the compressed format (see `format.py`), `load` checks and rebuilds it without
materialising dense weights, `save_dense` / `export_dense` write ordinary HF folders (merged by
`dense.py`), checked before they are moved into place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer

from ..errors import SocoError
from ..runtime import dtype_name, parse_dtype
from . import hf_quantizer  # noqa: F401  formats 1-2's quantization_config: from_pretrained names the fix
from .atomic import atomic_dir, atomic_write_json
from .dense import check_dense_folder, merge_to_dense
from .format import (FACTORED_WEIGHTS, FORMAT_KEYS, LOAD_GUARD, WEIGHTS, compression_section,
                     read_compression)
from .rebuild import check_folder, load_weights, rebuild

log = logging.getLogger(__name__)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (the loader re-ties them), made contiguous for safetensors."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else (name,)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def _config_dict(model: nn.Module) -> dict:
    d = model.config.to_dict()
    for k in FORMAT_KEYS:
        d.pop(k, None)
    # The dtype the weights are saved in, which loading "as saved" (dtype="auto") reads: `.to(dtype)` leaves
    # the config's own entry as it was, so a model compressed in bf16 would come back as float32.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        for key in {"dtype", "torch_dtype"} & set(d) or {"dtype"}:  # transformers 5 writes dtype, 4 torch_dtype
            d[key] = dtype_name(dtype)
    return d


def _write_model(folder: Path, model: nn.Module, tokenizer, config: dict, weights: str = WEIGHTS) -> None:
    # Inside a fresh temporary folder (atomic_dir): a plain write here is already atomic at the folder level.
    save_file(unique_state_dict(model), str(folder / weights), metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", config)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_compressed(model: nn.Module, tokenizer, out: str | os.PathLike, report, overwrite: bool = False) -> Path:
    """Write a compressed model folder; `report.tensors` ({filename: tensors}) are saved beside it."""
    config = _config_dict(model)
    config["compression"] = compression_section(model, report)
    config["transformers_weights"] = LOAD_GUARD  # see format.py: plain transformers fails, naming the fix
    with atomic_dir(out, overwrite) as tmp:
        _write_model(tmp, model, tokenizer, config, FACTORED_WEIGHTS)
        atomic_write_json(tmp / "compression_report.json", report.to_dict())
        for fname, tensors in report.tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / fname))
    log.info("saved compressed model to %s", out)
    return Path(out)


def save_dense(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an ordinary HF folder; compressed layers are merged back to dense weights first, and the folder
    is checked to load exactly with plain transformers before it is moved into place."""
    merge_to_dense(model)
    with atomic_dir(out, overwrite) as tmp:
        _write_model(tmp, model, tokenizer, _config_dict(model))
        check_dense_folder(tmp, repr(str(out)))
    return Path(out)


def load(folder: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str = "cpu") -> nn.Module:
    """Rebuild a saved soco-llm model (compressed and/or quantized, any readable format) from its folder by
    explicit surgery (`rebuild.py`), without materialising dense weights: the folder is checked first
    (`format.check_folder`) and every tensor must fit the rebuilt model."""
    folder = Path(folder)
    comp = check_folder(folder)
    where = repr(str(folder))
    model = load_weights(rebuild(folder, comp, where), folder, comp, where)
    dtype = parse_dtype(dtype)
    if dtype is not None:
        model = model.to(dtype)  # integer (quantized) tensors keep their type
    return model.to(device).eval()


def export_dense(folder: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an ordinary dense HF folder from a compressed one, for any serving engine."""
    if read_compression(folder).get("quantization"):
        raise SocoError(f"{str(folder)!r} is quantized; export-dense writes float weights, so export the "
                        "compressed folder from before quantization (or load this one with soco_llm.load)")
    model = load(folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # a folder saved without a tokenizer still exports
        tok = None
    return save_dense(model, tok, out, overwrite)
