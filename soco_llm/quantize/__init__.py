"""Weight-only int8 / int4 quantization of any model, dense or compressed, from the same code
(`quantize_model`): the decoder linears, including the `nn.Linear` factors of compressed layers, become
`QuantizedLinear` layers (`linear.py`: saved as plain integer tensors, run by PyTorch's kernels per device).
`model.py` owns which layers, the layout checks and rank multiples, and the rebuild when a folder loads."""

from .linear import GROUP_SIZES, SCHEMES, QuantizedLinear
from .model import (DEFAULT_GROUP_SIZE, check_layout, check_scheme, quantization_section, quantize_model,
                    rank_multiple, rebuild_quantized, target_names)

__all__ = ["DEFAULT_GROUP_SIZE", "GROUP_SIZES", "QuantizedLinear", "SCHEMES", "check_layout", "check_scheme",
           "quantization_section", "quantize_model", "rank_multiple", "rebuild_quantized", "target_names"]
