"""Registers the compressed format with transformers, so that after `import soco_llm`
`AutoModelForCausalLM.from_pretrained(folder)` rebuilds LowRankLinear layers on the meta
device before the weights load: dense weights are never materialised.
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.adapter import linear_shape, replace_module
from ..core.layer import LowRankLinear
from ..errors import SocoError
from .format import FORMAT_VERSION, QUANT_METHOD


class SocoLowRankConfig(QuantizationConfigMixin):
    def __init__(self, format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version}


class SocoLowRankQuantizer(HfQuantizer):
    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        comp = getattr(model.config, "compression", None)
        if not isinstance(comp, dict) or "ranks" not in comp:
            raise SocoError("config.json has quant_method soco_lowrank but no 'compression' section; the folder is corrupt")
        biased = set(comp.get("biased", []))
        for name, rank in comp["ranks"].items():
            if rank <= 0:
                continue  # left dense
            try:
                old = model.get_submodule(name)
            except AttributeError as e:
                raise SocoError(f"compressed layer {name!r} does not exist in {type(model).__name__}") from e
            m, n = linear_shape(old)
            layer = LowRankLinear(n, m, rank, bias=name in biased, dtype=old.weight.dtype, device=old.weight.device,
                                  dense_cls=type(old))
            replace_module(model, name, layer)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(SocoLowRankConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(SocoLowRankQuantizer)
