"""soco-llm: compress Hugging Face causal LMs by low-rank (SVD) factorisation of their linear layers.

    model, tok = soco_llm.load_model()                      # bundled SmolLM2-135M-Instruct
    calib = soco_llm.calibration_windows(tok)
    report = soco_llm.compress(model, soco_llm.SVDLLMConfig(ratio=0.4), calib)
    soco_llm.save_compressed(model, tok, "out", report)
    model = soco_llm.load("out")
"""

__version__ = "0.1.0"

from .config import (ASVDConfig, CalibrationConfig, CompressionConfig, FWSVDConfig, SVDConfig, SVDLLMConfig,
                     config_for, config_from_dict)
from .compress import CompressionReport, compress
from .data import calibration_windows, eval_windows
from .errors import SocoError
from .evaluate import evaluate_perplexity, perplexity
from .io import export_dense, load, merge_to_dense, save_compressed, save_dense
from .layer import LowRankLinear
from .models import load_model
from .soco import SoCoConfig, export_from_run
from . import hf_integration  # noqa: F401,E402  lets AutoModelForCausalLM load compressed folders

__all__ = [
    "ASVDConfig", "CalibrationConfig", "CompressionConfig", "CompressionReport", "FWSVDConfig", "LowRankLinear",
    "SVDConfig", "SVDLLMConfig", "SoCoConfig", "export_from_run", "SocoError", "calibration_windows", "compress", "config_for", "config_from_dict",
    "eval_windows", "evaluate_perplexity", "export_dense", "load", "load_model", "merge_to_dense", "perplexity",
    "save_compressed", "save_dense",
]
