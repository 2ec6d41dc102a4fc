"""The output head a chunk of positions at a time, so that no pass holds a whole batch's vocabulary-sized logits.

The logits are the largest tensors a training step or an evaluation makes (4 × 512 positions × 49,152 words:
402 MiB in float32, with their log-softmax and gradient as large again). Every consumer here reads them a row
at a time (a loss, a log-likelihood, a top-k), so the model's body runs once and its head is applied to a
chunk of positions at a time: `head_logits` for passes without gradients, `ChunkedHeadLoss` for training
(like Liger-Kernel's fused linear cross-entropy). `head_split` decides, per model, whether the logits are
the head applied to the body's last hidden states, by comparing both on a few tokens; where they are not (a
soft-capped or scaled head, a head that is not a plain `nn.Linear`), callers take the model's whole logits.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Logits per chunk: 16 MiB in float32, below glibc's 32 MiB mmap threshold, so a chunk's buffers are reused
# from the heap instead of being mapped and page-faulted afresh each time.
CHUNK_ELEMENTS = 1 << 22

HeadSplit = tuple[nn.Module, nn.Linear]  # (body, head): head(body(ids).last_hidden_state) are the logits


def row_chunks(rows: int, vocab: int) -> Iterator[slice]:
    """Slices of `rows` positions, CHUNK_ELEMENTS logits of a `vocab`-word head each."""
    step = max(1, CHUNK_ELEMENTS // vocab)
    return (slice(s, s + step) for s in range(0, rows, step))


def head_split(model: nn.Module, sample: torch.Tensor) -> HeadSplit | None:
    """(body, head) where head(body(ids).last_hidden_state) equals the model's logits on `sample`; None where
    it does not, or nothing can be compared (the meta device)."""
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
    # Compared in float32: a model may upcast its logits (every consumer reads them in float32 either way).
    same = split.shape == whole.shape and torch.allclose(split.float(), whole.float(), rtol=1e-4, atol=1e-4)
    return (body, head) if same else None


def predicting_hidden(body: nn.Module, head: nn.Linear, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states of positions 0..L-2 of `ids` (those that predict a next token), flattened to
    rows batch-major, on the head's device (a model split over devices: the head's hooks are bypassed)."""
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    return hidden.reshape(-1, hidden.shape[-1]).to(head.weight.device)


def head_logits(model: nn.Module, ids: torch.Tensor, split: HeadSplit | None) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, float32 logits [rows, V]) of the positions predicting tokens 1..L-1 of `ids` (rows batch-major),
    a chunk at a time through `split`, or all at once from the model's logits without one."""
    if split is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        yield slice(0, None), logits.reshape(-1, logits.shape[-1]).float()
        return
    body, head = split
    hidden = predicting_hidden(body, head, ids)
    for rows in row_chunks(hidden.shape[0], head.weight.shape[0]):
        yield rows, F.linear(hidden[rows], head.weight, head.bias).float()


# (float32 logits [rows, V], the targets' rows...) -> the loss of each row [rows]
RowLoss = Callable[..., torch.Tensor]


class ChunkedHeadLoss(torch.autograd.Function):
    """mean over rows of row_loss(h Wᵀ + b, targets), made a chunk of rows at a time; differentiable in h.

    Each chunk's gradient with respect to its hidden states is taken as soon as its loss is (the head is
    frozen: only ∂h is needed), so a chunk's logits are freed before the next one's are made. The same loss
    and gradient as the whole logits give, to summation order."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_loss: RowLoss, *targets):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for rows in row_chunks(hidden.shape[0], weight.shape[0]):
            with torch.enable_grad():
                logits = F.linear(hidden[rows], weight, bias).detach().float().requires_grad_(grad_h is not None)
                loss = row_loss(logits, *(t[rows] for t in targets)).sum()
            if grad_h is not None:
                (grad_logits,) = torch.autograd.grad(loss, logits)
                torch.mm(grad_logits.to(weight.dtype), weight, out=grad_h[rows])
            total += loss.detach()
        if grad_h is not None:
            ctx.save_for_backward(grad_h.div_(hidden.shape[0]))  # in place: the buffer is this Function's own
        return total / hidden.shape[0]

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), None, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)
