"""Perplexity by the standard protocol: non-overlapping windows, exp of the mean token NLL.

When the tokenizer defines BOS, each window is BOS + (seq_len−1) text tokens and BOS itself is
never scored, so every window scores seq_len−1 predictions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import at_least, check
from ..data import eval_windows
from ..errors import SocoError

# What the evaluation settings may be; the CLI's --eval-* options are parsed with the same rules.
EVAL_RULES = {"seq_len": at_least(2), "max_windows": at_least(0, note="0: all"), "batch_size": at_least(1)}


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # scored tokens
    windows: int
    seq_len: int
    bos: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.4g} over {self.tokens} tokens "
                f"({self.windows} windows of {self.seq_len}{', BOS prepended' if self.bos else ''})")


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, bos: bool = False,
               desc: str = "perplexity") -> PerplexityResult:
    """`windows`: LongTensor [n, seq_len]; `bos`: whether column 0 is a prepended BOS (for the record)."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise SocoError("perplexity needs at least one token window")
    check("perplexity batch_size", batch_size, int, EVAL_RULES["batch_size"])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    model.train(was_training)
    mean = total / count
    return PerplexityResult(math.exp(mean) if mean < 700 else float("inf"), mean, count,
                            windows.shape[0], windows.shape[1], bos)


def evaluate_perplexity(model: nn.Module, tokenizer, source: str = "bundled", seq_len: int = 512,
                        max_windows: int | None = 24, batch_size: int = 4) -> PerplexityResult:
    """Perplexity on held-out text: 'bundled' (BoolQ dev passages), wikitext2, c4, ptb, or a text file."""
    for name, value in (("seq_len", seq_len), ("max_windows", max_windows or 0)):  # batch_size: perplexity()
        check(f"perplexity {name}", value, int, EVAL_RULES[name])
    windows = eval_windows(tokenizer, source, seq_len, max_windows)
    return perplexity(model, windows, batch_size, bos=getattr(tokenizer, "bos_token_id", None) is not None,
                      desc=f"perplexity ({source})")
