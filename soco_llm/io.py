"""Saving and loading: safetensors + JSON only, written atomically, never over a folder unasked.

A compressed folder is an ordinary HF folder whose config.json carries
  "compression": {format_version, method, ratio_definition, ranks, biased, config, ...}
  "quantization_config": {"quant_method": "soco_lowrank"}
The second key lets plain `AutoModelForCausalLM.from_pretrained` rebuild it after `import soco_llm`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import SocoError
from .layer import LowRankLinear

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUANT_METHOD = "soco_lowrank"
WEIGHTS = "model.safetensors"


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; move it into place only if the block succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SocoError(f"output folder {str(out)!r} already exists; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


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
    for k in ("compression", "quantization_config"):
        d.pop(k, None)
    return d


def _write_model(folder: Path, model: nn.Module, tokenizer, config: dict) -> None:
    save_file(unique_state_dict(model), str(folder / WEIGHTS), metadata={"format": "pt"})
    atomic_write_json(folder / "config.json", config)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def compression_section(model: nn.Module, report) -> dict:
    from . import __version__

    biased = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear) and m.bias is not None]
    return {
        "format_version": FORMAT_VERSION,
        "library": f"soco-llm {__version__}",
        "method": report.method,
        "ratio_definition": report.ratio_definition,
        "target_ratio": report.target_ratio,
        "achieved_ratio": report.achieved_ratio,
        "ranks": report.ranks,
        "biased": biased,
        "config": report.config,
    }


def save_compressed(model: nn.Module, tokenizer, out: str | os.PathLike, report, overwrite: bool = False) -> Path:
    """Write a compressed model folder; `report.tensors` ({filename: tensors}) are saved beside it."""
    config = _config_dict(model)
    config["compression"] = compression_section(model, report)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
    with atomic_dir(out, overwrite) as tmp:
        _write_model(tmp, model, tokenizer, config)
        atomic_write_json(tmp / "compression_report.json", report.to_dict())
        for fname, tensors in report.tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / fname))
    log.info("saved compressed model to %s", out)
    return Path(out)


def save_dense(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an ordinary HF folder; compressed layers are merged back to dense weights first."""
    merge_to_dense(model)
    with atomic_dir(out, overwrite) as tmp:
        _write_model(tmp, model, tokenizer, _config_dict(model))
    return Path(out)


@torch.no_grad()
def merge_to_dense(model: nn.Module) -> nn.Module:
    """Replace every LowRankLinear by the dense module it came from (W = B·A), in place."""
    from transformers.pytorch_utils import Conv1D

    from .adapter import replace_module

    for name, m in list(model.named_modules()):
        if not isinstance(m, LowRankLinear):
            continue
        W = m.B @ m.A
        if m.dense_cls is Conv1D:
            dense = Conv1D(m.out_features, m.in_features).to(W.device, W.dtype)
            dense.weight.copy_(W.T)
            dense.bias.copy_(m.bias if m.bias is not None else torch.zeros_like(dense.bias))
        else:
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=W.device, dtype=W.dtype)
            dense.weight.copy_(W)
            if m.bias is not None:
                dense.bias.copy_(m.bias)
        replace_module(model, name, dense)
    for k in ("compression", "quantization_config"):
        if hasattr(model.config, k):
            delattr(model.config, k)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    return model


def read_compression(folder: str | os.PathLike) -> dict:
    """The `compression` section of a compressed folder, with clear errors for bad folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SocoError(f"model folder {str(folder)!r} not found")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SocoError(f"{str(folder)!r} has no config.json; is it a model folder written by `soco compress`?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SocoError(f"{cfg_path} is not valid JSON ({e.msg}); the folder is corrupt, re-create it") from e
    comp = cfg.get("compression")
    if not isinstance(comp, dict) or "ranks" not in comp:
        raise SocoError(f"{str(folder)!r} is not a soco-llm compressed model (no 'compression' section in config.json)")
    if comp.get("format_version", 0) > FORMAT_VERSION:
        raise SocoError(f"{str(folder)!r} uses format version {comp['format_version']}; upgrade soco-llm to read it")
    return comp


def check_weights(folder: Path) -> None:
    """Open every safetensors file's header so a truncated or corrupt file fails with one clear line."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SocoError(f"{str(folder)!r} has no .safetensors weights; the folder is incomplete")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    h.get_slice(k)
        except Exception as e:
            raise SocoError(f"{f} is corrupt or truncated ({str(e).splitlines()[0]}); re-create the folder") from e


def load(folder: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str = "cpu") -> nn.Module:
    """Rebuild a compressed model from its folder, without materialising dense weights."""
    from transformers import AutoModelForCausalLM

    from . import hf_integration  # noqa: F401
    from .models import parse_dtype

    read_compression(folder)
    check_weights(Path(folder))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=parse_dtype(dtype) or "auto")
    except Exception as e:
        raise SocoError(f"could not load {str(folder)!r}: {str(e).strip().splitlines()[0]}") from e
    return model.to(device).eval()


def export_dense(folder: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an ordinary dense HF folder from a compressed one, for any serving engine."""
    from transformers import AutoTokenizer

    model = load(folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # a folder saved without a tokenizer still exports
        tok = None
    return save_dense(model, tok, out, overwrite)
