"""Perplexity by the standard protocol: non-overlapping windows, exp of the mean token NLL.

When the tokenizer defines BOS, each window is BOS + (seq_len−1) text tokens and BOS itself is
never scored, so every window scores seq_len−1 predictions.

The same pass can keep the model's top-k next-token log-probs on those windows (`keep_topk`, done for the
dense model), and then measure another model's held-out KL to them (`reference`): KL on text that nothing
trains on, beside the training KL, with no extra pass of either model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import at_least, check
from ..core.head import head_logits, head_split
from ..core.teacher import Teacher, kl_per_position, top_k_rows
from ..data import eval_windows
from ..errors import SocoError

# What the evaluation settings may be; the CLI's --eval-* options are parsed with the same rules.
EVAL_SEQ_LEN = 512  # the default window, for models that read that many positions
EVAL_RULES = {"seq_len": at_least(2), "max_windows": at_least(0, note="0: all"), "batch_size": at_least(1)}


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # scored tokens
    windows: int
    seq_len: int
    bos: bool
    source: str | None = None  # the text source's name, where known
    kl: float | None = None  # mean held-out KL(reference ‖ this model) per token, when a reference was given
    kept: Teacher | None = field(default=None, repr=False)  # this model's top-k log-probs, with keep_topk

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "kept"}

    def __str__(self) -> str:
        kl = f", held-out KL to dense {self.kl:.4f}" if self.kl is not None else ""
        return (f"perplexity {self.perplexity:.4g} over {self.tokens} tokens "
                f"({self.windows} windows of {self.seq_len}{', BOS prepended' if self.bos else ''}{kl})")


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, bos: bool = False,
               desc: str = "perplexity", reference: Teacher | None = None, keep_topk: int = 0,
               source: str | None = None) -> PerplexityResult:
    """`windows`: LongTensor [n, seq_len]; `bos`: whether column 0 is a prepended BOS (for the record).
    `reference`: top-k log-probs of another model on these windows (a `kept` of an earlier call), to measure
    the KL to; `keep_topk`: keep this model's top-k log-probs in the result."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise SocoError("perplexity needs at least one token window")
    check("perplexity batch_size", batch_size, int, EVAL_RULES["batch_size"])
    if reference is not None and tuple(reference.rest_logp.shape) != (windows.shape[0], windows.shape[1] - 1):
        raise ValueError("the reference log-probs are for other windows")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # The head a chunk of positions at a time (core/head.py): a batch's whole logits would be the pass's peak.
    split = head_split(model, windows[:1, :8].to(device))
    total, count, kl_sum, kept = 0.0, 0, 0.0, []
    start = 0
    for batch in tqdm(windows.split(batch_size), desc=desc):
        batch = batch.to(device)
        targets = batch[:, 1:].reshape(-1)
        if reference is not None:
            these = slice(start, start + batch.shape[0])
            ref = [t[these].to(device).flatten(0, 1)
                   for t in (reference.top_logp, reference.top_idx, reference.rest_logp)]
        nll, kl, parts = 0.0, 0.0, []
        for rows, logits in head_logits(model, batch, split):
            nll = nll + F.cross_entropy(logits, targets[rows].to(logits.device), reduction="sum")
            if reference is not None:
                kl = kl + kl_per_position(logits, *(r[rows].to(logits.device) for r in ref)).sum()
            if keep_topk:
                parts.append(top_k_rows(logits, keep_topk))
        total += float(nll)
        count += targets.numel()
        kl_sum += float(kl)
        if keep_topk:
            kept.append(Teacher.from_rows(parts, batch.shape))
        start += batch.shape[0]
    model.train(was_training)
    mean = total / count
    return PerplexityResult(math.exp(mean) if mean < 700 else float("inf"), mean, count,
                            windows.shape[0], windows.shape[1], bos, source,
                            kl_sum / count if reference is not None else None,
                            Teacher.concat(kept) if kept else None)


def evaluate_perplexity(model: nn.Module, tokenizer, source: str = "bundled", seq_len: int = EVAL_SEQ_LEN,
                        max_windows: int | None = 24, batch_size: int = 4, reference: Teacher | None = None,
                        keep_topk: int = 0) -> PerplexityResult:
    """Perplexity on held-out text: 'bundled' (BoolQ dev passages), 'pubmed' (PubMedQA abstracts), wikitext2,
    c4, ptb, or a text file. `reference` and `keep_topk` as in `perplexity`."""
    for name, value in (("seq_len", seq_len), ("max_windows", max_windows or 0)):  # batch_size: perplexity()
        check(f"perplexity {name}", value, int, EVAL_RULES[name])
    windows = eval_windows(tokenizer, source, seq_len, max_windows)
    return perplexity(model, windows, batch_size, bos=getattr(tokenizer, "bos_token_id", None) is not None,
                      desc=f"perplexity ({source})", reference=reference, keep_topk=keep_topk, source=source)
