"""transformers' hook for folders of formats 1 and 2, which named `"quant_method": "soco_lowrank"` in
config.json's quantization_config: after `import soco_llm`, `AutoModelForCausalLM.from_pretrained` on such a
folder fails naming the fix (`soco_llm.load`, which reads them exactly) instead of "unknown quantization
method" or a model with random factors. Format 3 folders leave quantization_config free (see format.py).
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import SocoError
from .format import QUANT_METHOD


class SocoLowRankConfig(QuantizationConfigMixin):
    def __init__(self, format_version: int = 2, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version}


class SocoLowRankQuantizer(HfQuantizer):
    requires_calibration = False

    def update_attn_implementation(self, config):
        # The first hook that sees the config, before any weight is read.
        where = repr(str(getattr(config, "name_or_path", "") or "the compressed model"))
        raise SocoError(f"{where} is a soco-llm compressed folder of format {self.quantization_config.format_version}: "
                        "load it with soco_llm.load(folder) (from_pretrained cannot rebuild its factored layers)")

    def _process_model_before_weight_loading(self, model, **kwargs):
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self):
        return False

    @property
    def is_trainable(self):
        return False


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(SocoLowRankConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(SocoLowRankQuantizer)
