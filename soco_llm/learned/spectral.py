"""The trainable spectrum layer a learned method trains (SoCo's, and any other's on a spectral basis): y = B₀ ((σ ⊙ s ⊙ h) ⊙ (A₀ x)) + bias + d.

A₀ (k×n) and B₀ (m×k) are the frozen singular vectors of one basis (plain or whitened),
σ the singular values, s a learnable score per component (starts at 1) and d a learnable
deviation d, a bias added to the output (starts at 0). h is a soft keep-gate shared through `GateState`:

    h_i = sigmoid((log(|s_i|·q_i) − log θ) / T)

q_i is a fixed per-layer prior that puts the uniform SVD-LLM cut at importance 1, so a run
starts from that cut's order and the learned scores re-rank from there. θ (the global
threshold) is solved every step so that the soft size meets the scheduled budget; T is the
temperature. With θ = 0 every gate is exactly 1. In `hard` mode (straight-through) the forward
pass uses the global cut at the step's budget as a 0/1 mask and gradients flow through the soft
gate, so the model being trained is the model a cut would save. Like acip's projected layer, it
never builds the full weight.

This module owns the layer and its installation in a model (`install_spectral`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Target, replace_module


@dataclass
class GateState:
    """Shared by every SpectralLinear of a model; the trainer sets it each step."""

    # log θ: a 0-dim tensor on the layers' device (solved there each step, so reading it needs no host
    # sync), or −inf: all gates open (keep all).
    log_theta: torch.Tensor | float = float("-inf")
    temperature: float = 0.3
    hard: bool = False  # straight-through: forward the exact cut (`mask`), backward through the soft gate


class SpectralLinear(nn.Module):
    # In hard mode on the CPU, multiply only the kept components (benchmarks/train_step.py turns it off to
    # time the full masked product, which every other device runs).
    kept_only_on_cpu: bool = True

    def __init__(self, left: torch.Tensor, sigma: torch.Tensor, right: torch.Tensor, prior: torch.Tensor,
                 bias: torch.Tensor | None, gate: GateState, dense_cls: type[nn.Module] = nn.Linear,
                 scale: torch.Tensor | None = None):
        super().__init__()
        dtype = left.dtype
        self.out_features, self.in_features = left.shape[0], right.shape[1]
        # B₀ (m×k) is kept column-major: the CPU's kept-only product gathers its columns every step, and F.linear
        # reads it as a transposed operand at no cost.
        self.register_buffer("left", left.t().contiguous().t(), persistent=False)
        self.register_buffer("right", right.contiguous(), persistent=False)  # A₀: k×n
        self.register_buffer("sigma", sigma.to(dtype), persistent=False)
        self.register_buffer("prior", prior.to(torch.float32), persistent=False)
        # σ and A₀ come divided and multiplied by `scale` (a power of two; see basis.half_precision_scale), so
        # that they fit half precision; the true singular values are sigma · scale.
        scale = torch.ones((), dtype=torch.float64, device=left.device) if scale is None else scale
        self.register_buffer("scale", scale.to(device=left.device, dtype=torch.float64), persistent=False)
        self.register_buffer("orig_bias", None if bias is None else bias.to(dtype), persistent=False)
        self.dense_cls = dense_cls  # what the cut's LowRankLinear turns back into
        # Trainable state lives where the basis lives (float32 for stable Adam updates in any model dtype).
        kw = {"dtype": torch.float32, "device": left.device}
        self.scores = nn.Parameter(torch.ones(sigma.numel(), **kw))
        self.deviation = nn.Parameter(torch.zeros(self.out_features, **kw))
        self.gate_state = gate
        self.register_buffer("mask", torch.ones(sigma.numel(), **kw), persistent=False)  # the exact cut, when hard

    @property
    def k(self) -> int:
        return self.sigma.numel()

    def spectrum(self) -> torch.Tensor:
        """The true singular values σ (fp64)."""
        return self.sigma.double() * self.scale

    def importance(self) -> torch.Tensor:
        """Learned importance |s|·q; the global cut ranks every component of every layer by it."""
        return self.scores.abs() * self.prior

    def soft_gate(self) -> torch.Tensor:
        g = self.gate_state
        if isinstance(g.log_theta, float) and g.log_theta == float("-inf"):
            return torch.ones_like(self.scores)
        return torch.sigmoid((torch.log(self.importance() + 1e-30) - g.log_theta) / g.temperature)

    def gate(self) -> torch.Tensor:
        """The gate the forward pass uses: soft, or the exact cut with the soft gate's gradient."""
        soft = self.soft_gate()
        return self.mask + soft - soft.detach() if self.gate_state.hard else soft

    def gated_sigma(self) -> torch.Tensor:
        """σ ⊙ s ⊙ h: the singular values the forward pass uses."""
        return self.sigma * (self.scores * self.gate()).to(self.sigma.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Finding the kept components is a host read: free on the CPU, a stall every step on a GPU.
        kept_only = self.gate_state.hard and self.kept_only_on_cpu and x.device.type == "cpu"
        y = self.kept_product(x) if kept_only else self.masked_product(x)
        return y + self.deviation.to(y.dtype)

    def masked_product(self, x: torch.Tensor) -> torch.Tensor:
        """B₀ (gated σ ⊙ A₀ x) + bias over every component (cut ones with a gate of 0 in hard mode)."""
        h = F.linear(x, self.right) * self.gated_sigma()
        return F.linear(h, self.left, self.orig_bias)

    def kept_product(self, x: torch.Tensor) -> torch.Tensor:
        """The same in hard mode, multiplying only the components the cut keeps (`KeptProduct`)."""
        order = torch.argsort(self.mask, descending=True, stable=True)  # kept components first, in σ's order
        y = KeptProduct.apply(x, self.right, self.left, self.gated_sigma(), order, int(self.mask.sum()))
        return y if self.orig_bias is None else y + self.orig_bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, components={self.k}"


class KeptProduct(torch.autograd.Function):
    """y = B₀[:, kept] (g[kept] ⊙ (A₀ x)[kept]) with the gradient of every component's g = σ⊙s⊙h.

    The hard cut gives cut components g = 0, so their terms are exact zeros: skipping them changes y only
    by summation order. Their gradient still flows (straight-through: a cut component can come back), which
    needs A₀x and B₀ᵀ∂y for all k components; but y and ∂x need only the kept ones, so of the four k-wide
    products of a step two shrink to the kept width. The components are permuted kept-first in the
    (small) factors, so the kept activations are a view, never a copy, and g scales the factors, not the
    activations."""

    @staticmethod
    def forward(ctx, x, right, left, g, order, n_kept):
        h = F.linear(x.reshape(-1, x.shape[-1]), right[order])
        kept = order[:n_kept]
        y = F.linear(h[:, :n_kept], left.t()[kept].t() * g[kept])  # rows of B₀ᵀ: a contiguous gather
        # The permuted factors are gathered again in the backward pass (contiguous rows of A₀ and of the
        # column-major B₀: cheap) rather than kept: a copy of the whole basis would stay alive until then.
        ctx.save_for_backward(h, right, left, g, order)
        ctx.n_kept = n_kept
        return y.reshape(*x.shape[:-1], left.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        h, right, left, g, order = ctx.saved_tensors
        n_kept = ctx.n_kept
        right, left, g = right[order], left.t()[order].t(), g[order]
        grad_h = grad_y.reshape(-1, grad_y.shape[-1]) @ left
        grad_g = torch.empty_like(g).index_copy_(0, order, (h * grad_h).sum(0, dtype=torch.float32).to(g.dtype))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h[:, :n_kept] @ (right[:n_kept] * g[:n_kept, None])).reshape(*grad_y.shape[:-1], -1)
        return grad_x, None, None, grad_g, None, None


def install_spectral(model: nn.Module, targets: list[Target], basis: dict[str, dict[str, torch.Tensor]],
                     gate: GateState) -> dict[str, SpectralLinear]:
    """Replace every target by a SpectralLinear over its basis entry (left, sigma, right, prior, bias)."""
    layers = {}
    for t in targets:
        b = basis[t.name]
        layer = SpectralLinear(b["left"], b["sigma"], b["right"], b["prior"], b.get("bias"), gate, type(t.module),
                               b.get("scale"))  # a cache written before the scale was stored holds true σ
        replace_module(model, t.name, layer)
        layers[t.name] = layer
    return layers
