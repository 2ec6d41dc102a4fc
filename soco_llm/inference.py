"""The fast inference path, one call for dense and compressed models alike, so a speed comparison is fair:
a static KV cache and a `torch.compile`d decode step.

transformers compiles only the decode call (prefill stays eager, so a new prompt length costs no
recompilation) once `generation_config.compile_config` is set and the cache is static. On CUDA the
mode is "reduce-overhead" (CUDA graphs: one launch per step instead of one per kernel, which is
what bounds eager decoding of small batches); on a CPU inductor's C++ kernels fuse the norms,
rotary and elementwise work and drop the per-op Python dispatch. The first `generate` pays for the
compilation (tens of seconds to minutes); later ones reuse it.
"""

from __future__ import annotations

from torch import nn

from .errors import SocoError


def fast_inference(model: nn.Module, mode: str | None = None) -> nn.Module:
    """Turn on the fast path for `model.generate` (in place; returns the model). `mode`: torch.compile's
    mode (default: "reduce-overhead" on CUDA, "default" elsewhere)."""
    try:
        from transformers import CompileConfig
    except ImportError as e:  # transformers older than 4.48
        raise SocoError("the fast path needs transformers >= 4.48 (CompileConfig); pip install -U transformers") from e
    if getattr(model, "generation_config", None) is None:
        raise SocoError("the fast path needs a transformers generation model (with a generation_config)")
    device = next(model.parameters()).device
    config = CompileConfig(fullgraph=False, dynamic=False,
                           mode=mode or ("reduce-overhead" if device.type == "cuda" else "default"))
    config._compile_all_devices = True  # transformers compiles on CUDA-like devices only unless told
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config
    return model
