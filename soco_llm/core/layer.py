"""The compressed layer, `LowRankLinear`: y = B (A x) + bias, with A: rank×in and B: out×rank.

It owns its conversions both ways: built from a dense `nn.Linear` / GPT-2 `Conv1D` it replaces
(`replacing`), and turned back into that module type (`to_dense`), so no other code needs to
know which dense class a layer came from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class LowRankLinear(nn.Module):
    """Drop-in replacement for `nn.Linear` (and GPT-2's `Conv1D`) holding two factors.

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
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                     dense_cls: type[nn.Module] = nn.Linear) -> "LowRankLinear":
        layer = cls(A.shape[1], B.shape[0], A.shape[0], bias=bias is not None, dtype=A.dtype, device=A.device,
                    dense_cls=dense_cls)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B.to(A.dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(A.dtype))
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

    @property
    def weight(self) -> torch.Tensor:
        """The merged (out, in) weight; built on demand, never stored."""
        return self.B @ self.A

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The dense module this layer stands for (W = B·A), of the type it replaced."""
        W = self.B @ self.A
        if self.dense_cls is Conv1D:  # GPT-2 stores (in, out) and always has a bias
            dense = Conv1D(self.out_features, self.in_features).to(W.device, W.dtype)
            dense.weight.copy_(W.T)
            dense.bias.copy_(self.bias if self.bias is not None else torch.zeros_like(dense.bias))
            return dense
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=W.device,
                          dtype=W.dtype)
        dense.weight.copy_(W)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        if self.merge_min_tokens is not None and tokens >= self.merge_min_tokens:
            return F.linear(x, self.B @ self.A, self.bias)
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
