"""The trainable spectrum layer SoCo learns on: y = B₀ ((σ ⊙ s ⊙ h) ⊙ (A₀ x)) + bias + d.

A₀ (k×n) and B₀ (m×k) are the frozen singular vectors of one basis (plain or whitened),
σ the singular values, s a learnable score per component (starts at 1) and d a learnable
deviation bias (starts at 0). h is a soft keep-gate shared through `GateState`:

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
from torch import nn

from ...core.adapter import Target, replace_module


@dataclass
class GateState:
    """Shared by every SpectralLinear of a model; the trainer sets it each step."""

    # log θ: a 0-dim tensor on the layers' device (solved there each step, so reading it needs no host
    # sync), or −inf: all gates open (keep all).
    log_theta: torch.Tensor | float = float("-inf")
    temperature: float = 0.3
    hard: bool = False  # straight-through: forward the exact cut (`mask`), backward through the soft gate


class SpectralLinear(nn.Module):
    def __init__(self, left: torch.Tensor, sigma: torch.Tensor, right: torch.Tensor, prior: torch.Tensor,
                 bias: torch.Tensor | None, gate: GateState, dense_cls: type[nn.Module] = nn.Linear):
        super().__init__()
        dtype = left.dtype
        self.out_features, self.in_features = left.shape[0], right.shape[1]
        self.register_buffer("left", left.contiguous(), persistent=False)  # B₀: m×k
        self.register_buffer("right", right.contiguous(), persistent=False)  # A₀: k×n
        self.register_buffer("sigma", sigma.to(dtype), persistent=False)
        self.register_buffer("prior", prior.to(torch.float32), persistent=False)
        self.register_buffer("orig_bias", None if bias is None else bias.to(dtype), persistent=False)
        self.dense_cls = dense_cls  # what the cut's LowRankLinear turns back into
        # Trainable state lives where the basis lives (float32 for stable Adam updates in any model dtype).
        kw = {"dtype": torch.float32, "device": left.device}
        self.scores = nn.Parameter(torch.ones(sigma.numel(), **kw))
        self.delta = nn.Parameter(torch.zeros(self.out_features, **kw))
        self.gate_state = gate
        self.register_buffer("mask", torch.ones(sigma.numel(), **kw), persistent=False)  # the exact cut, when hard

    @property
    def k(self) -> int:
        return self.sigma.numel()

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
        h = torch.nn.functional.linear(x, self.right) * self.gated_sigma()
        y = torch.nn.functional.linear(h, self.left, self.orig_bias)
        return y + self.delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, components={self.k}"


def install_spectral(model: nn.Module, targets: list[Target], basis: dict[str, dict[str, torch.Tensor]],
                     gate: GateState) -> dict[str, SpectralLinear]:
    """Replace every target by a SpectralLinear over its basis entry (left, sigma, right, prior, bias)."""
    layers = {}
    for t in targets:
        b = basis[t.name]
        layer = SpectralLinear(b["left"], b["sigma"], b["right"], b["prior"], b.get("bias"), gate, type(t.module))
        replace_module(model, t.name, layer)
        layers[t.name] = layer
    return layers
