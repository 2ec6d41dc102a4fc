"""The dense model as teacher: its top-k next-token log-probs cached once per training window, and
the KL of a student to them. No second model copy, no teacher pass per step. A training step takes the
KL through the output head a chunk of positions at a time (`ChunkedHeadKL`), never holding the whole
batch's vocabulary-sized logits."""

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


# Logits elements per chunk of the fused head: 16 MiB in float32, below glibc's 32 MiB mmap threshold, so each
# chunk's buffers are reused from the heap instead of being mapped and page-faulted afresh.
CHUNK_ELEMENTS = 1 << 22


class ChunkedHeadKL(torch.autograd.Function):
    """The mean KL of softmax(h Wᵀ + b) to the teacher, never holding the logits of the whole batch.

    The output head's logits are the largest tensors of a step (1024 tokens × 49k words: 192 MiB, with their
    log-softmax and gradient as large again). Here they are made a chunk of positions at a time, and each chunk's
    gradient with respect to its hidden states is taken at once (the head is frozen: only ∂h is needed), so a
    chunk's logits are freed before the next one's are made. Same KL and gradient as the plain path, to
    summation order; like the fused linear cross-entropy of Liger-Kernel."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, top_logp, top_idx, rest_logp):
        h = hidden.reshape(-1, hidden.shape[-1])
        top_logp, top_idx = top_logp.reshape(-1, top_logp.shape[-1]), top_idx.reshape(-1, top_idx.shape[-1])
        rest_logp = rest_logp.reshape(-1)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        total = h.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, h.shape[0], rows):
            part = slice(s, s + rows)
            with torch.enable_grad():
                logits = F.linear(h[part], weight, bias).detach().requires_grad_(grad_h is not None)
                kl = kl_per_position(logits, top_logp[part], top_idx[part], rest_logp[part]).sum()
            if grad_h is not None:
                (grad_logits,) = torch.autograd.grad(kl, logits)
                torch.mm(grad_logits.to(weight.dtype), weight, out=grad_h[part])
            total += kl.detach()
        if grad_h is not None:
            ctx.save_for_backward(grad_h.view_as(hidden) / h.shape[0])
        return total / h.shape[0]

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None, None


def _head_split(model: nn.Module, sample: torch.Tensor):
    """(body, head) such that head(body(ids).last_hidden_state) is the model's logits, checked on `sample`; None
    where the model is not that (a soft-capped or scaled head, a head that is not a plain Linear, or the meta
    device, where nothing can be compared): the plain path then computes the whole logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if type(head) is not nn.Linear or body is None or body is model or sample.device.type == "meta":
        return None
    with torch.no_grad():
        try:
            split = head(body(input_ids=sample, use_cache=False).last_hidden_state)
        except (TypeError, AttributeError):  # a body without that interface
            return None
        whole = model(input_ids=sample, use_cache=False).logits
    # Compared in float32: a model may upcast its logits (the KL reads them in float32 either way).
    same = split.shape == whole.shape and torch.allclose(split.float(), whole.float(), rtol=1e-4, atol=1e-4)
    return (body, head) if same else None


def student_kl(model: nn.Module, ids: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor,
               rest_logp: torch.Tensor, split=None) -> torch.Tensor:
    """The mean KL of `model` on `ids` to their teacher entries: through the fused head where `split` (from
    `_head_split`) allows and the head is frozen, else from the whole logits."""
    if split is not None:
        body, head = split
        if not any(p.requires_grad for p in head.parameters()):
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            on = head.weight.device  # the head's own (a model split over devices: its hooks are bypassed here)
            return ChunkedHeadKL.apply(hidden.to(on), head.weight, head.bias, top_logp.to(on), top_idx.to(on),
                                       rest_logp.to(on))
    return kl_to_teacher(model(input_ids=ids, use_cache=False).logits, top_logp, top_idx, rest_logp)


def kl_batch_loss(model: nn.Module, windows: torch.Tensor, teacher: Teacher, batch_size: int) -> BatchLoss:
    """KL to the cached teacher on `batch_size` windows drawn by the step's generator (split over ranks)."""
    device = next(model.parameters()).device
    split = _head_split(model, windows[:1, :8].to(device))

    def loss(gen: torch.Generator, rank: int, world: int) -> torch.Tensor:
        idx = torch.randint(0, windows.shape[0], (batch_size,), generator=gen)[rank::world]
        return student_kl(model, windows[idx].to(device), teacher.top_logp[idx].to(device),
                          teacher.top_idx[idx].to(device), teacher.rest_logp[idx].to(device), split)
    return loss
