"""Text generation from a dense or compressed model, timed: what `soco generate` prints.

Greedy decoding with the KV cache through transformers' `generate`; tokens/s counts the new
tokens over the wall time of the call (prefill included, so it is what a user waits for). With
`fast`, the model decodes on the fast path (`soco_llm.inference`); one untimed warm-up call pays
for the compilation first, so tokens/s is what a served model gives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SocoError
from ..inference import fast_inference


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False,
             fast: bool = False) -> Generation:
    """Greedy continuation of `prompt` (with the tokenizer's chat template when `chat`; on the fast path
    when `fast`)."""
    if max_new_tokens < 1:
        raise SocoError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SocoError("this tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise SocoError("the prompt is empty; give some text with --prompt")
    device = next(model.parameters()).device
    ids = ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    def run():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad)

    if fast:
        fast_inference(model)
        run()  # compiles the decode step: a one-off cost, not the model's speed
    start = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], int(new.numel()), seconds)
