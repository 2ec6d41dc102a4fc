"""`QuantizedLinear`: a weight-only int8 or int4 linear layer, saved as plain integer tensors and run by
PyTorch's own kernels, chosen by the device the layer is on.

Saved (the state dict, device-neutral safetensors):
  int8  `qweight` int8 (out, in_padded) and `scale` (out,): w = qweight · scale, symmetric per output
        channel (torchao's int8 weight-only scheme); the input width is padded with zero columns to a
        multiple of 16 (`torch._weight_int8pack_mm` in bf16 crashes on other widths: a factor's rank);
  int4  `qweight` uint8 (out, in_padded/2), two 4-bit values a byte (even column in the high nibble, as
        PyTorch's CUDA int4 packing takes it), and `scales_and_zeros` (in_padded/group, out, 2):
        w = (q − 8) · scale + zero per group of `group_size` input columns (torchao's / tinygemm's
        asymmetric groupwise scheme). An input width that is not a multiple of the group is padded
        with zero columns (the input is padded likewise, so the result is exact).
  and the layer's `bias`, if any.

Run:
  CPU   int8 `torch._weight_int8pack_mm`, int4 `torch._weight_int4pack_mm_for_cpu` on the weight
        repacked by `torch._convert_weight_to_int4pack_for_cpu` (kept beside the layer, never saved).
        Measured in the issue (torch 2.13, 1 thread): 2.1× and 3.3× faster than float32, where torchao's
        CPU tensor subclasses were 2.8-12× slower or unsupported.
  CUDA  int8 dequantize-in-matmul (torchao's int8 weight-only computes the same; compile fuses it), int4
        tinygemm `torch._weight_int4pack_mm` on `torch._convert_weight_to_int4pack` (the kernel torchao's
        tile-packed int4 layout calls); both need bf16 activations for int4.
Quantizing (the integers and scales) is torchao's code (`torchao.quantization.utils`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels take
OUT_MULTIPLE = 16  # the CPU int4 packing takes an output width that is a multiple of this
INT8_IN_MULTIPLE = 16  # the CPU int8 kernel reads bf16 inputs in blocks of this many columns


def padded(width: int, group_size: int) -> int:
    return -(-width // group_size) * group_size


def _torchao_utils():
    # torchao is imported only when quantizing: its import is slow and loading a folder does not need it
    from torchao.quantization import utils
    return utils


class QuantizedLinear(nn.Module):
    """y = x Wᵀ + bias with W stored as int8 (per channel) or int4 (per group); see the module docstring."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int | None = None,
                 bias: bool = False, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group_size = group_size if scheme == "int4" else None
        dtype = dtype or torch.get_default_dtype()
        if scheme == "int8":
            k = padded(in_features, INT8_IN_MULTIPLE)
            self.register_buffer("qweight", torch.empty(out_features, k, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        else:
            k = padded(in_features, group_size)
            self.register_buffer("qweight", torch.empty(out_features, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales_and_zeros", torch.empty(k // group_size, out_features, 2, dtype=dtype,
                                                                 device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self._packed: tuple[torch.device, torch.Tensor] | None = None  # int4 in the kernel's layout, per device

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Module, scheme: str, group_size: int | None = None) -> "QuantizedLinear":
        """Quantize an `nn.Linear` (or GPT-2 `Conv1D`): its weight, kept in its dtype and device for scales."""
        from ..core.adapter import linear_weight
        w = linear_weight(linear).detach()
        out_f, in_f = w.shape
        bias = getattr(linear, "bias", None)
        layer = cls(in_f, out_f, scheme, group_size, bias is not None, w.dtype, w.device)
        utils = _torchao_utils()
        if scheme == "int8":
            q, scale, _ = utils.dynamically_quantize_per_channel(w.float(), -128, 127, torch.int8)
            layer.qweight.copy_(F.pad(q, (0, layer.qweight.shape[1] - in_f)))
            layer.scale.copy_(scale.to(w.dtype))
        else:
            k = padded(in_f, group_size)
            wp = F.pad(w.float(), (0, k - in_f))
            q, sz = utils.groupwise_affine_quantize_tensor(wp, 4, group_size, torch.float32)
            q = q.to(torch.int32)
            layer.qweight.copy_((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8))
            layer.scales_and_zeros.copy_(sz.to(w.dtype))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def _int4_values(self) -> torch.Tensor:
        """(out, in_padded) int32 values in [0, 15]."""
        q = self.qweight.to(torch.int32)
        return torch.stack([q >> 4, q & 0xF], dim=-1).reshape(self.out_features, -1)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The (out, in) weight the integers stand for, in the scales' dtype."""
        if self.scheme == "int8":
            return self.qweight[:, : self.in_features].to(self.scale.dtype) * self.scale[:, None]
        scales, zeros = self.scales_and_zeros.float().unbind(-1)  # (groups, out) each
        g = self.group_size
        w = (self._int4_values().float() - 8) * scales.T.repeat_interleave(g, 1) + zeros.T.repeat_interleave(g, 1)
        return w[:, : self.in_features].to(self.scales_and_zeros.dtype)

    def _int4_packed(self, device: torch.device) -> torch.Tensor:
        if self._packed is None or self._packed[0] != device:
            if device.type == "cpu":
                packed = torch._convert_weight_to_int4pack_for_cpu(self._int4_values(), 1)
            else:
                k = self.qweight.shape[1] * 2
                tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
                packed = torch._convert_weight_to_int4pack(self.qweight, tiles)
            self._packed = (device, packed)
        return self._packed[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.scheme == "int8":
            k = self.qweight.shape[1]
            if k != self.in_features:
                x2 = F.pad(x2, (0, k - self.in_features))
            if x.device.type == "cpu":
                y = torch._weight_int8pack_mm(x2, self.qweight, self.scale.to(x.dtype))
            else:
                y = F.linear(x2, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        else:
            k = self.qweight.shape[1] * 2
            if k != self.in_features:
                x2 = F.pad(x2, (0, k - self.in_features))
            sz = self.scales_and_zeros.to(x.dtype)
            if x.device.type == "cpu":
                y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self._int4_packed(x.device), self.group_size, sz)
            else:
                y = torch._weight_int4pack_mm(x2.contiguous(), self._int4_packed(x.device), self.group_size, sz)
        y = y.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new integers: repack on the next call
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{g}, " \
               f"bias={self.bias is not None}"
