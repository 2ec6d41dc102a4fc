"""The dense model as teacher: its top-k next-token log-probs cached once per training window, and
the KL of a student to them. No second model copy, no teacher pass per step. Both go through the output
head a chunk of positions at a time (`head.py`), never holding a whole batch's vocabulary-sized logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .head import ChunkedHeadLoss, HeadSplit, head_logits, head_split, predicting_hidden

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

    @classmethod
    def from_rows(cls, parts: list[tuple[torch.Tensor, ...]], ids_shape: torch.Size) -> "Teacher":
        """The entry of one batch of windows [B, L] from `top_k_rows` of its positions' chunks, in order; kept
        on the host: the cache for all windows can be larger than what the device holds."""
        b, length = ids_shape
        return cls(*(torch.cat([p[i] for p in parts]).reshape(b, length - 1, *parts[0][i].shape[1:]).cpu()
                     for i in range(3)))


def top_k_rows(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs, their token ids, the log-prob of all the rest) of each row of logits [..., V]."""
    logp = F.log_softmax(logits.float(), -1)
    top, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return top, idx, torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))


@torch.no_grad()
def teacher_cache(model: nn.Module, windows: torch.Tensor, k: int, batch_size: int) -> Teacher:
    device = next(model.parameters()).device
    split = head_split(model, windows[:1, :8].to(device))
    parts = []
    for batch in tqdm(windows.split(batch_size), desc="soco teacher"):
        rows = [top_k_rows(logits, k) for _, logits in head_logits(model, batch.to(device), split)]
        parts.append(Teacher.from_rows(rows, batch.shape))
    teacher = Teacher.concat(parts)
    teacher.windows = windows.cpu()
    return teacher


def kl_per_position(logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
                    rest_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) at each position of `logits` [..., V], over the teacher's top-k tokens plus one
    bucket for the rest.

    A full log-softmax, though only k log-probs per position are read: taking them as logits minus their
    logsumexp was measured no faster on the whole step (benchmarks/results/train_step_kl_cpu.md)."""
    logq = F.log_softmax(logits.float(), -1)
    q_top = logq.gather(-1, top_idx)
    q_rest = torch.log((1 - q_top.exp().sum(-1)).clamp_min(1e-12))
    return (top_logp.exp() * (top_logp - q_top)).sum(-1) + rest_logp.exp() * (rest_logp - q_rest)


def kl_to_teacher(logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
                  rest_logp: torch.Tensor) -> torch.Tensor:
    """The mean KL of a batch's logits [B, L, V] to its teacher entries (which predict positions 1..L-1)."""
    return kl_per_position(logits[:, :-1], top_logp, top_idx, rest_logp).mean()


def student_kl(model: nn.Module, ids: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
               rest_logp: torch.Tensor, split: HeadSplit | None = None) -> torch.Tensor:
    """The mean KL of `model` on `ids` to their teacher entries: through the chunked head where `split` (from
    `head_split`) allows and the head is frozen (a trained head needs its own gradient), else from the whole
    logits."""
    if split is not None and not any(p.requires_grad for p in split[1].parameters()):
        body, head = split
        on = head.weight.device
        return ChunkedHeadLoss.apply(predicting_hidden(body, head, ids), head.weight, head.bias, kl_per_position,
                                     top_logp.reshape(-1, top_logp.shape[-1]).to(on),
                                     top_idx.reshape(-1, top_idx.shape[-1]).to(on), rest_logp.reshape(-1).to(on))
    return kl_to_teacher(model(input_ids=ids, use_cache=False).logits, top_logp, top_idx, rest_logp)


def kl_batch_loss(model: nn.Module, windows: torch.Tensor, teacher: Teacher, batch_size: int) -> BatchLoss:
    """KL to the cached teacher on `batch_size` windows drawn by the step's generator (split over ranks)."""
    device = next(model.parameters()).device
    split = head_split(model, windows[:1, :8].to(device))

    def loss(gen: torch.Generator, rank: int, world: int) -> torch.Tensor:
        idx = torch.randint(0, windows.shape[0], (batch_size,), generator=gen)[rank::world]
        return student_kl(model, windows[idx].to(device), teacher.top_logp[idx].to(device),
                          teacher.top_idx[idx].to(device), teacher.rest_logp[idx].to(device), split)
    return loss
