"""The compressed layer, `LowRankLinear`: y = B(A(x)), two standard `nn.Linear` modules, A: in → rank without
a bias and B: rank → out holding the layer's bias (and SoCo's trained bias d).

Because both factors are ordinary `nn.Linear` modules, every library that handles `nn.Linear` (torchao's
`quantize_`, peft, bitsandbytes, the standard kernels) handles the factors unchanged; soco-llm's own
quantization (`soco_llm.quantize`) swaps them the same way.

It owns its conversions both ways: built from a dense `nn.Linear` / GPT-2 `Conv1D` it replaces
(`replacing`), and turned back into that module type (`to_dense`), so no other code needs to
know which dense class a layer came from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a factor as a plain tensor: a quantized factor (soco_llm.quantize's
    `QuantizedLinear`, or an `nn.Linear` whose weight is a torchao tensor subclass) is dequantized."""
    if hasattr(linear, "dequantize"):
        return linear.dequantize()
    w = linear.weight
    return w if type(w) in (torch.Tensor, nn.Parameter) else w.dequantize()


class LowRankLinear(nn.Module):
    """Drop-in replacement for `nn.Linear` (and GPT-2's `Conv1D`) made of two `nn.Linear` factors.

    `merge_min_tokens`: at or above this many tokens in one call the forward pass builds
    W = B·A and does one matmul; below it runs the two thin matmuls. Measured with
    `python benchmarks/layer_crossover.py`: building B·A costs more than it saves at every
    token count we tried for layers that are actually compressed (rank < m·n/(m+n)), so the
    default is None (always factored). Set it per layer where your hardware says otherwise.
    """

    merge_min_tokens: int | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dense_cls: type[nn.Module] = nn.Linear,
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dense_cls = dense_cls  # what `to_dense` turns it back into
        kw = {"dtype": dtype, "device": device}
        # skip_init: the values are always set by the caller (factors, or a state dict); no random init to pay
        self.A = nn.utils.skip_init(nn.Linear, in_features, rank, bias=False, **kw)
        self.B = nn.utils.skip_init(nn.Linear, rank, out_features, bias=bias, **kw)
        if bias:
            with torch.no_grad():
                self.B.bias.zero_()

    @property
    def bias(self) -> torch.Tensor | None:
        """The layer's bias (B's)."""
        return self.B.bias

    def __setattr__(self, name, value):
        if name == "bias":  # `layer.bias = ...` sets B's, as on an nn.Linear
            self.B.bias = value
        else:
            super().__setattr__(name, value)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                     dense_cls: type[nn.Module] = nn.Linear) -> "LowRankLinear":
        """A layer with A (rank×in), B (out×rank) and `bias` (out), in A's dtype and device."""
        layer = cls(A.shape[1], B.shape[0], A.shape[0], bias=bias is not None, dtype=A.dtype, device=A.device,
                    dense_cls=dense_cls)
        with torch.no_grad():
            layer.A.weight.copy_(A)
            layer.B.weight.copy_(B.to(A.dtype))
            if bias is not None:
                layer.B.bias.copy_(bias.to(A.dtype))
        return layer

    @classmethod
    def replacing(cls, old: nn.Module, A: torch.Tensor, B: torch.Tensor,
                  bias: torch.Tensor | None = None) -> "LowRankLinear":
        """A layer to put where dense `old` was: its device, dtype, trainability and type to convert back to.

        `bias`: the bias to hold; by default `old`'s own (None if it has none).
        """
        w = old.weight
        if bias is None and getattr(old, "bias", None) is not None:
            bias = old.bias.detach()
        layer = cls.from_factors(A.to(w.device, w.dtype), B.to(w.device, w.dtype),
                                 None if bias is None else bias.to(w.device, w.dtype), type(old))
        layer.requires_grad_(w.requires_grad)
        return layer

    def merged_weight(self) -> torch.Tensor:
        """W = B·A (out, in), built on demand (never stored; not used by the forward pass)."""
        return linear_weight(self.B) @ linear_weight(self.A)

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The dense module this layer stands for (W = B·A), of the type it replaced."""
        W = self.merged_weight()
        bias = self.bias
        if self.dense_cls is Conv1D:  # GPT-2 stores (in, out) and always has a bias
            dense = Conv1D(self.out_features, self.in_features).to(W.device, W.dtype)
            dense.weight.copy_(W.T)
            dense.bias.copy_(bias if bias is not None else torch.zeros_like(dense.bias))
            return dense
        dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=W.device,
                          dtype=W.dtype)
        dense.weight.copy_(W)
        if bias is not None:
            dense.bias.copy_(bias)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merge_min_tokens is not None and x.numel() // self.in_features >= self.merge_min_tokens:
            return F.linear(x, self.merged_weight(), self.bias)
        return self.B(self.A(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
