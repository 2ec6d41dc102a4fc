"""The saved format of a compressed folder: its version, its `compression` section in config.json,
and the checks that a folder is one (config, version, readable weights).

A compressed folder is an ordinary HF folder whose config.json carries
  "compression": {format_version, method, ratio_definition, ranks, biased, config, ...}
  "quantization_config": {"quant_method": "soco_lowrank"}
The second key lets plain `AutoModelForCausalLM.from_pretrained` rebuild it after `import soco_llm`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from torch import nn

from ..version import __version__
from ..core.layer import LowRankLinear
from ..errors import SocoError

FORMAT_VERSION = 1
QUANT_METHOD = "soco_lowrank"
WEIGHTS = "model.safetensors"


def compression_section(model: nn.Module, report) -> dict:
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
