"""soco-llm: compress Hugging Face causal LMs by low-rank (SVD) factorisation of their linear layers.

    model, tok = soco_llm.load_model()                      # bundled SmolLM2-135M-Instruct
    calib = soco_llm.calibration_windows(tok)
    report = soco_llm.compress(model, soco_llm.SVDLLMConfig(ratio=0.4), calib)
    soco_llm.save_compressed(model, tok, "out", report)
    model = soco_llm.load("out")
    soco_llm.fast_inference(model)                          # static KV cache + compiled decode for generate()

Layout: `core/` (method-agnostic parts), `methods/` (one config + handler per method),
`io/` (files), `eval/` (perplexity, zero-shot), `compress.py` (the one entry point), `quantize/` (int8 / int4
weights), `cli.py`. Importing the package registers formats 1-2's hook with transformers (`io.hf_quantizer`).
"""

import logging

# transformers imports torchao whenever it is installed, and torchao then logs a warning per CUDA extension
# a CPU build cannot load (and torch one per enum it registers): noise on stderr above every CLI message.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .version import __version__  # noqa: E402,F401
from .compress import compress  # noqa: E402
from .core.layer import LowRankLinear  # noqa: E402
from .core.report import CompressionReport  # noqa: E402
from .data import calibration_windows, eval_windows  # noqa: E402
from .errors import SocoError  # noqa: E402
from .heal import HealConfig  # noqa: E402
from .eval.perplexity import evaluate_perplexity, perplexity  # noqa: E402
from .inference import fast_inference  # noqa: E402
from .io import export_dense, load, merge_to_dense, save_compressed, save_dense  # noqa: E402
from .methods import (ASVDConfig, CalibrationConfig, CompressionConfig, FWSVDConfig, SoCoConfig,  # noqa: E402
                      SVDConfig, SVDLLMConfig, config_for, config_from_dict, export_from_run, register)
from .models import load_model  # noqa: E402

__all__ = [
    "ASVDConfig", "CalibrationConfig", "CompressionConfig", "CompressionReport", "FWSVDConfig", "HealConfig", "LowRankLinear",
    "SVDConfig", "SVDLLMConfig", "SoCoConfig", "export_from_run", "SocoError", "calibration_windows", "compress",
    "config_for", "config_from_dict", "eval_windows", "evaluate_perplexity", "export_dense", "fast_inference", "load", "load_model",
    "merge_to_dense", "perplexity", "register", "save_compressed", "save_dense",
]
