"""Registers the compressed format with transformers, so that after `import soco_llm`
`AutoModelForCausalLM.from_pretrained(folder)` rebuilds LowRankLinear layers on the meta
device before the weights load: dense weights are never materialised.

It also makes that load exact or an error: the compression section is checked before the model is
built, the weights file is checked against the rebuilt model before any tensor loads (transformers
itself would only print a report and initialise missing tensors at random), and the format's load
guard (`format.LOAD_GUARD`) is swapped for the real weights file.
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.adapter import is_linear, linear_shape, replace_module
from ..core.layer import LowRankLinear
from ..errors import SocoError
from .format import FORMAT_VERSION, LOAD_GUARD, QUANT_METHOD, WEIGHTS, check_against_model, check_compression, \
    read_shapes


class SocoLowRankConfig(QuantizationConfigMixin):
    def __init__(self, format_version: int = FORMAT_VERSION, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version}


def _where(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return repr(str(getattr(config, "name_or_path", "") or "the compressed model"))


class SocoLowRankQuantizer(HfQuantizer):
    requires_calibration = False

    def update_attn_implementation(self, config):
        # The one hook that sees the whole config before the weights file is resolved and the model is built:
        # refuse a bad compression section here, and replace the load guard by the real weights file.
        check_compression(getattr(config, "compression", None), _where(config))
        if getattr(config, "transformers_weights", None) == LOAD_GUARD:
            config.transformers_weights = WEIGHTS
        return super().update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        comp = check_compression(getattr(model.config, "compression", None), _where(model))
        biased = set(comp.get("biased", []))
        for name, rank in comp["ranks"].items():
            if rank == 0:
                continue  # left dense
            try:
                old = model.get_submodule(name)
            except AttributeError:
                old = None
            if not is_linear(old):
                raise SocoError(f"{_where(model)}: compressed layer {name!r} is not a linear layer of "
                                f"{type(model).__name__}; the folder is corrupt, re-create it")
            m, n = linear_shape(old)
            layer = LowRankLinear(n, m, rank, bias=name in biased, dtype=old.weight.dtype, device=old.weight.device,
                                  dense_cls=type(old))
            replace_module(model, name, layer)
        if checkpoint_files:
            check_against_model(model, read_shapes(checkpoint_files), _where(model))
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
