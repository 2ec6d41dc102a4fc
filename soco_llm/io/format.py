"""The saved format of a compressed (or quantized) folder: its version, its `compression` section in
config.json, the load guard, and the checks that a folder (or a set of weights beside a model) is complete
and exact.

A format-3 folder is an HF folder (safetensors + config.json) whose config.json carries
  "compression": {format_version, method, ratio_definition, ranks, biased, config,
                  quantization: null | {scheme, group_size, layers}, ...}
  "transformers_weights": LOAD_GUARD
Loading rebuilds the structure by explicit surgery (`rebuild.py`): `soco_llm.load`. The guard makes plain
`AutoModelForCausalLM.from_pretrained` fail, naming the fix, with or without `import soco_llm`, instead of
loading random weights. transformers' single `quantization_config` slot is left free.

Formats 1 and 2 (still read) stored the factors as bare parameters `x.A` / `x.B` and used
"quantization_config": {"quant_method": "soco_lowrank"} as transformers' loading hook; format 1 had no guard.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import safe_open
from torch import nn

from ..version import __version__
from ..core.layer import LowRankLinear
from ..errors import SocoError
from ..quantize import quantization_section

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
QUANT_METHOD = "soco_lowrank"  # formats 1 and 2's transformers hook (io/hf_quantizer.py)
# Config entries that describe the format; an ordinary dense folder carries none of them.
FORMAT_KEYS = ("compression", "quantization_config", "transformers_weights")
WEIGHTS = "model.safetensors"  # an ordinary HF folder's weights, and those of formats 1 and 2
# Format 3's weights: a name transformers never looks for, so that a folder whose guard was removed from
# config.json (by hand, or by a tool that rewrites it) makes from_pretrained find no weights and fail, rather
# than load the architecture with every compressed layer initialised at random.
FACTORED_WEIGHTS = "soco_model.safetensors"


def weights_file(folder: Path, comp: dict) -> Path:
    """The weights file of a compressed folder of the format `comp` (its compression section) names."""
    return Path(folder) / (FACTORED_WEIGHTS if comp["format_version"] >= 3 else WEIGHTS)
# transformers refuses a `transformers_weights` that is not a *.safetensors name and prints it, so this
# sentence is what a user sees when the folder is loaded without soco-llm's hook (see the module docstring).
LOAD_GUARD = ("soco-llm compressed model: load it with `import soco_llm; soco_llm.load(folder)` (pip install "
              "soco-llm), or write a plain dense folder with `soco export-dense`; from_pretrained cannot rebuild "
              "its factored layers")
# A dotted module path of identifiers and indices, never a dunder segment: a name from config.json is
# handed to get_submodule, so `..`, `__class__` or a path cannot reach anything outside the module tree.
_NAME = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]*|[0-9]+")


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
        "quantization": quantization_section(model),
    }


def read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise SocoError(f"model folder {str(folder)!r} not found")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SocoError(f"{str(folder)!r} has no config.json; is it a model folder written by `soco compress`?")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SocoError(f"{cfg_path} is not valid JSON ({str(e).splitlines()[0]}); the folder is corrupt, "
                        "re-create it") from None
    if not isinstance(cfg, dict):
        raise SocoError(f"{cfg_path} is not a JSON object; the folder is corrupt, re-create it")
    return cfg


def check_compression(comp, where: str) -> dict:
    """`comp` is a readable compression section: known version, ranks {module name: int >= 0} (0 = left
    dense), `biased` naming compressed layers. `where` names the folder in the messages."""
    if not isinstance(comp, dict) or "ranks" not in comp:
        raise SocoError(f"{where} is not a soco-llm compressed model (no 'compression' section in config.json)")
    version = comp.get("format_version")
    if type(version) is int and version > READABLE_VERSIONS[-1]:
        raise SocoError(f"{where} uses format version {version}; upgrade soco-llm to read it")
    if version not in READABLE_VERSIONS or type(version) is not int:
        raise SocoError(f"{where} has an invalid format_version {version!r} (known: {list(READABLE_VERSIONS)}); "
                        "the folder is corrupt, re-create it")
    ranks, biased = comp["ranks"], comp.get("biased", [])
    if not isinstance(ranks, dict) or not isinstance(biased, list):
        raise SocoError(f"{where}: compression.ranks must be an object and compression.biased a list; "
                        "the folder is corrupt, re-create it")
    for name, rank in ranks.items():
        if not all(_NAME.fullmatch(s) for s in name.split(".")):
            raise SocoError(f"{where}: {name!r} in compression.ranks is not a module name; the folder is corrupt "
                            "or hostile, re-create it")
        if type(rank) is not int or rank < 0:
            raise SocoError(f"{where}: the rank of {name} is {rank!r}, not an integer >= 1 (or 0 for a layer "
                            "left dense); the folder is corrupt, re-create it")
    bad = [b for b in biased if not isinstance(b, str) or ranks.get(b, 0) == 0]
    if bad:
        raise SocoError(f"{where}: compression.biased names {bad[0]!r}, which compression.ranks does not list "
                        "with a rank >= 1; the folder is corrupt, re-create it")
    return comp


def read_compression(folder: str | os.PathLike) -> dict:
    """The checked `compression` section of a compressed folder (config.json only), with clear errors."""
    return check_compression(read_config(Path(folder)).get("compression"), repr(str(folder)))


def read_shapes(files) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from safetensors headers (no tensor data read); a truncated or corrupt file,
    or a tensor stored twice, fails with one clear line."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    if k in shapes:
                        raise SocoError(f"tensor {k} is stored twice ({f}); the folder is corrupt, re-create it")
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        except SocoError:
            raise
        except Exception as e:
            raise SocoError(f"{f} is corrupt or truncated ({str(e).splitlines()[0]}); re-create the folder") from e
    return shapes


def check_weights(folder: Path) -> None:
    """Open every safetensors file's header so a truncated or corrupt file fails with one clear line."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise SocoError(f"{str(folder)!r} has no .safetensors weights; the folder is incomplete")
    read_shapes(files)


def check_against_model(model: nn.Module, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """The tensors in `shapes` are exactly what `model` (usually built on the meta device) takes: none
    missing, none left over, every shape equal. transformers would only print a report and initialise
    the missing ones at random; here that is an error."""
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    partner = {**tied, **{v: k for k, v in tied.items()}}  # one of a tied pair is stored (unique_state_dict)
    ignore_missing = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    ignore_unexpected = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    missing = [k for k in expected if k not in shapes and partner.get(k) not in shapes
               and not any(p.search(k) for p in ignore_missing)]
    unexpected = [k for k in shapes if k not in expected and not any(p.search(k) for p in ignore_unexpected)]
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    arch = type(model).__name__
    if missing:
        raise SocoError(f"{where}: {len(missing)} tensor(s) that {arch} needs are missing from the weights "
                        f"(first: {missing[0]}); the folder is incomplete or damaged, re-create it")
    if unexpected:
        raise SocoError(f"{where}: the weights hold {len(unexpected)} tensor(s) that {arch} has no place for "
                        f"(first: {unexpected[0]}), which loading would drop; the folder is damaged, re-create it")
    if wrong:
        k = wrong[0]
        raise SocoError(f"{where}: {k} has shape {list(shapes[k])} in the weights but {list(expected[k])} in "
                        f"{arch} ({len(wrong)} such tensor(s)); the folder is corrupt, re-create it")
