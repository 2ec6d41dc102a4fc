"""What the speed scripts time: random-weight models in public shapes, and the dense model with its copies.

`load_models` gives speed.py and decode_profile.py the same list: the dense model first (every
ratio is against it), then one data-free SVD copy per ratio, then saved compressed folders.
Importing this module is cheap (tables.py reads `SHAPE_PREFIX`); the loaders import torch and the library.
"""

from __future__ import annotations

import os

# Public model shapes (from their config.json files) for timing larger models offline. Decode speed
# depends on the shapes, not on the weight values, so random weights time like the real model.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
}


def linear_shapes(name: str) -> dict[str, tuple[int, int]]:
    """(out, in) of every decoder linear of a Llama-style shape, by module name, without building the model."""
    s = SHAPES[name]
    h, i = s["hidden_size"], s["intermediate_size"]
    kv = s["num_key_value_heads"] * h // s["num_attention_heads"]
    per_block = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{b}.{k}": v for b in range(s["num_hidden_layers"]) for k, v in per_block.items()}
SHAPE_PREFIX = "shape:"


def random_model(name: str, dtype: str | None = "float32", device: str = "cpu", seed: int = 0):
    """A Llama-architecture model of a public shape (`SHAPES`) with random weights, for timing only."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from soco_llm.errors import SocoError
    from soco_llm.runtime import parse_dtype

    if name not in SHAPES:
        raise SocoError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    config = LlamaConfig(**SHAPES[name], tie_word_embeddings=True, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype=parse_dtype(dtype) or torch.float32)
    return model.to(device).eval()


def load_models(spec: str | None, ratios: list[float], folders: list[str], settings,
                dtype: str | None = "float32") -> list[tuple[dict, object, int | None]]:
    """(facts, model, pad_token_id): the dense `spec`, one SVD copy per ratio (compressed in place), saved folders.

    `spec` may be "shape:NAME" for a random-weight model of a public shape (see `SHAPES`);
    `settings` is a `timing.BenchSettings` (device and seed).
    """
    from tqdm.auto import tqdm

    from soco_llm import compress
    from soco_llm.methods.svd_family import SVDConfig
    from soco_llm.models import load_model

    from .rss import release_memory

    out = []
    jobs = [(spec, None)] + [(spec, r) for r in ratios] + [(f, None) for f in folders]
    for path, ratio in tqdm(jobs, desc="loading models"):
        if path and path.startswith(SHAPE_PREFIX):
            model, tok = random_model(path[len(SHAPE_PREFIX):], dtype, settings.device, settings.seed), None
        else:
            model, tok = load_model(path, dtype, settings.device)
        row: dict = {"label": "dense", "model": path or "default", "ratio": None, "achieved_ratio": 0.0}
        if ratio is not None:
            report = compress(model, SVDConfig(ratio=ratio))
            row.update(label=f"svd {ratio}", ratio=ratio, achieved_ratio=report.achieved_ratio)
        elif isinstance(getattr(model.config, "compression", None), dict):
            comp = model.config.compression
            row.update(label=os.path.basename(os.path.normpath(path)), ratio=comp.get("target_ratio"),
                       achieved_ratio=comp.get("achieved_ratio"))
        pad = 0 if tok is None else tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out.append((row, model, pad))
        release_memory()
    return out
