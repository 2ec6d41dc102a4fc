"""Tiny random models and a tiny tokenizer, built in code: nothing is downloaded."""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, OPTConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "opt", "gpt2"]

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. "
) * 4


def tiny_config(arch: str):
    common = dict(vocab_size=128, num_hidden_layers=2)
    if arch == "llama":  # grouped-query attention: 4 query heads share 2 kv heads
        return LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
                             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **common)
    if arch == "gemma3":
        return Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16, max_position_embeddings=256, sliding_window=16, bos_token_id=1,
                                eos_token_id=2, pad_token_id=0, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=96, num_attention_heads=4, word_embed_proj_dim=64,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2,
                          vocab_size=128, n_layer=2)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ids 0-3 special, then printable ASCII."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def random_windows(n: int = 8, seq_len: int = 32, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, seq_len), generator=g)


def top_k_entry(logits, k: int):
    """The teacher entry of one batch of logits [B, L, V] (predictions of positions 1..L-1), on the host."""
    from soco_llm.core.teacher import Teacher, top_k_rows

    return Teacher(*(t.cpu() for t in top_k_rows(logits[:, :-1], k)))
