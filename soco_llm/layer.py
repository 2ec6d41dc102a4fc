"""The compressed layer: y = B (A x) + bias, with A: rank×in and B: out×rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.dense_cls: type[nn.Module] = nn.Linear  # what export-dense turns it back into
        kw = {"dtype": dtype, "device": device}
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        layer = cls(A.shape[1], B.shape[0], A.shape[0], bias=bias is not None, dtype=A.dtype, device=A.device)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B.to(A.dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(A.dtype))
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The merged (out, in) weight; built on demand, never stored."""
        return self.B @ self.A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        if self.merge_min_tokens is not None and tokens >= self.merge_min_tokens:
            return F.linear(x, self.B @ self.A, self.bias)
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"
