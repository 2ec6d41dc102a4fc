"""What a model costs in parameters and bytes, counted by the benchmarks themselves.

`weight_stats` and `decode_limit`: the whole model, its linears and the weights one decode step
reads (speed.py, decode_profile.py). `decoder_linear_params`: the decoder-linear counts behind a
compression ratio, recounted from the modules rather than taken from the compression report, so
compare_methods.py checks the report instead of repeating it; `saved_size`: the bytes a saved
compressed model takes against the dense copy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from soco_llm.core.adapter import find_targets, is_linear
from soco_llm.core.layer import LowRankLinear
from soco_llm.io.format import FACTORED_WEIGHTS


def _unique_params(model) -> list:
    return list({id(p): p for p in model.parameters()}.values())


def _linear_like(module) -> bool:
    return is_linear(module) or isinstance(module, LowRankLinear)


def weight_stats(model) -> dict:
    """Parameter counts and bytes: whole model, linears other than the LM head, and per-token decode weights.

    `decode_params`: the weights one decode step reads: everything except the input-embedding
    lookup (one row), LM head included (when tied to the embedding it is counted as the head).
    """
    params = _unique_params(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head_w = getattr(head, "weight", None)
    emb_w = getattr(emb, "weight", None)
    skip = {id(emb_w)} - {id(head_w)} if emb_w is not None else set()
    seen, lin_params, lin_bytes = set(), 0, 0
    for module in model.modules():
        if module is head or not _linear_like(module):
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                lin_params += p.numel()
                lin_bytes += p.numel() * p.element_size()
    return {
        "params": sum(p.numel() for p in params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "linear_params": lin_params,
        "linear_bytes": lin_bytes,
        "decode_params": sum(p.numel() for p in params if id(p) not in skip),
        "low_rank_layers": sum(isinstance(m, LowRankLinear) for m in model.modules()),
    }


def decode_limit(dense: dict, compressed: dict) -> float:
    """Bandwidth-bound decode speed-up limit: weights read per token, dense / compressed."""
    return dense["decode_params"] / compressed["decode_params"]


def decoder_linear_inventory(model) -> dict[str, tuple[int, int, bool]]:
    """(out, in, had a bias) of every decoder linear a method may compress, by module name, before compressing."""
    return {t.name: (*t.shape, getattr(t.module, "bias", None) is not None) for t in find_targets(model)}


def decoder_linear_params(model, inventory: dict[str, tuple[int, int, bool]]) -> tuple[int, int]:
    """(old, new) decoder-linear parameter counts, counted independently of the compression report.

    A compressed layer costs its factors (r*(m+n)) plus any bias it did not have before (SoCo's d);
    a layer left dense costs m*n. Original biases are not counted, as in METHOD.md.
    """
    old = new = 0
    for name, (m, n, had_bias) in inventory.items():
        module = model.get_submodule(name)
        old += m * n
        if isinstance(module, LowRankLinear):
            new += module.A.weight.numel() + module.B.weight.numel()
            if module.bias is not None and not had_bias:
                new += module.bias.numel()
        else:
            new += m * n
    return old, new


def decoder_linear_bytes(weights: Path, names: list[str]) -> int:
    """Bytes of the tensors under the given module names in a safetensors file."""
    from safetensors import safe_open

    prefixes = tuple(n + "." for n in names)
    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefixes):
                sl = f.get_slice(key)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I32": 4, "I64": 8}[sl.get_dtype()]
    return total


def saved_size(model, tok, report, names: list[str]) -> dict:
    """Save the compressed model to a temp folder; compare its decoder-linear bytes with the dense copy's."""
    import soco_llm
    from soco_llm.models import default_model_dir

    dense_file = default_model_dir() / "model.safetensors"
    with tempfile.TemporaryDirectory(prefix="soco-bench-") as tmp:
        out = soco_llm.save_compressed(model, tok, Path(tmp) / "model", report)
        comp_file = out / FACTORED_WEIGHTS
        comp_lin = decoder_linear_bytes(comp_file, names)
        comp_total = comp_file.stat().st_size
    dense_lin = decoder_linear_bytes(dense_file, names)
    dense_total = dense_file.stat().st_size
    return {
        "decoder_linear_bytes_compressed": comp_lin,
        "decoder_linear_bytes_dense": dense_lin,
        "decoder_linear_fraction": comp_lin / dense_lin,
        "file_bytes_compressed": comp_total,
        "file_bytes_dense": dense_total,
        "file_fraction": comp_total / dense_total,
    }
