"""A candidate for SoCo's distillation KL that was measured and not adopted: the student's top-k log-probs
taken as logits minus their logsumexp, so no vocabulary-sized log-softmax tensor is written.

`benchmarks/train_step.py` times it against `soco_llm.core.teacher.kl_to_teacher` (the full log-softmax);
on the default model's step it was no faster (benchmarks/results/train_step_kl_cpu.md), so the library kept
the simpler form. tests/test_heal.py checks both give the same value and gradient, so the timing compares
like with like.
"""

from __future__ import annotations

import torch


def logsumexp_kl(logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
                 rest_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the teacher's top-k tokens plus one bucket for the rest."""
    z = logits[:, :-1].float()
    q_top = z.gather(-1, top_idx) - torch.logsumexp(z, -1, keepdim=True)
    q_rest = torch.log((1 - q_top.exp().sum(-1)).clamp_min(1e-12))
    kl = (top_logp.exp() * (top_logp - q_top)).sum(-1) + rest_logp.exp() * (rest_logp - q_rest)
    return kl.mean()
