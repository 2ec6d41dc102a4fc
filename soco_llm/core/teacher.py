"""The dense model as teacher: its top-k next-token log-probs cached once per training window, and
the KL of a student's logits to them. No second model copy, no teacher pass per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

# (step generator, process rank, world size) -> the distillation loss of one step's batch
BatchLoss = Callable[[torch.Generator, int, int], torch.Tensor]


@dataclass
class Teacher:
    """Top-k log-probs of the dense model for every training window (shifted: predictions 1..L-1)."""

    top_logp: torch.Tensor  # [N, L-1, k]
    top_idx: torch.Tensor  # [N, L-1, k] int64
    rest_logp: torch.Tensor  # [N, L-1]
    windows: torch.Tensor | None = None  # [N, L] the token windows these are for, where kept (saved with them)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"top_logp": self.top_logp, "top_idx": self.top_idx, "rest_logp": self.rest_logp}
        return out if self.windows is None else {**out, "windows": self.windows}

    @classmethod
    def concat(cls, parts: list["Teacher"]) -> "Teacher":
        return cls(*(torch.cat([getattr(t, f) for t in parts]) for f in ("top_logp", "top_idx", "rest_logp")))


def top_k_entry(logits: torch.Tensor, k: int) -> Teacher:
    """The teacher entry of one batch of logits [B, L, V], kept on the host: the cache for all windows can
    be larger than what the device holds."""
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    top, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    return Teacher(top.cpu(), idx.cpu(), rest.cpu())


@torch.no_grad()
def teacher_cache(model: nn.Module, windows: torch.Tensor, k: int, batch_size: int) -> Teacher:
    device = next(model.parameters()).device
    teacher = Teacher.concat([top_k_entry(model(input_ids=batch.to(device), use_cache=False).logits, k)
                              for batch in tqdm(windows.split(batch_size), desc="soco teacher")])
    teacher.windows = windows.cpu()
    return teacher


def kl_to_teacher(logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
                  rest_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the teacher's top-k tokens plus one bucket for the rest.

    A full log-softmax, though only k log-probs per position are read: taking them as logits minus their
    logsumexp was measured no faster on the whole step (benchmarks/results/train_step_kl_cpu.md)."""
    logq = F.log_softmax(logits[:, :-1].float(), -1)
    q_top = logq.gather(-1, top_idx)
    q_rest = torch.log((1 - q_top.exp().sum(-1)).clamp_min(1e-12))
    kl = (top_logp.exp() * (top_logp - q_top)).sum(-1) + rest_logp.exp() * (rest_logp - q_rest)
    return kl.mean()


def kl_batch_loss(model: nn.Module, windows: torch.Tensor, teacher: Teacher, batch_size: int) -> BatchLoss:
    """KL to the cached teacher on `batch_size` windows drawn by the step's generator (split over ranks)."""
    device = next(model.parameters()).device

    def loss(gen: torch.Generator, rank: int, world: int) -> torch.Tensor:
        idx = torch.randint(0, windows.shape[0], (batch_size,), generator=gen)[rank::world]
        logits = model(input_ids=windows[idx].to(device), use_cache=False).logits
        return kl_to_teacher(logits, teacher.top_logp[idx].to(device), teacher.top_idx[idx].to(device),
                             teacher.rest_logp[idx].to(device))
    return loss
