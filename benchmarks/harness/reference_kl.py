"""SoCo's distillation KL as first written (sessions 1-5): a full log-softmax over the vocabulary.

Kept as the baseline that `benchmarks/train_step.py` times `soco_llm.core.teacher.kl_to_teacher`
against, and as the reference tests/test_heal.py checks it equals (value and gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_kl(logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
                 rest_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the teacher's top-k tokens plus one bucket for the rest."""
    logq = F.log_softmax(logits[:, :-1].float(), -1)
    q_top = logq.gather(-1, top_idx)
    q_rest = torch.log((1 - q_top.exp().sum(-1)).clamp_min(1e-12))
    kl = (top_logp.exp() * (top_logp - q_top)).sum(-1) + rest_logp.exp() * (rest_logp - q_rest)
    return kl.mean()
