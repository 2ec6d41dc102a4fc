"""The output head a chunk of positions at a time (core/head.py): the same training loss and gradient, the same
teacher cache and evaluation as the whole logits give, and the whole logits wherever the model's logits are not
its head applied to its hidden states."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import soco_llm
import soco_llm.core.head as head_module
import soco_llm.core.teacher as teacher_module
from soco_llm.core.head import ChunkedHeadLoss, head_split
from soco_llm.core.teacher import kl_batch_loss, kl_per_position, kl_to_teacher, student_kl, teacher_cache
from tiny import ARCHS, random_windows, tiny_config, tiny_model, top_k_entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_loss_equals_the_whole_logits_kl_in_value_and_gradient(monkeypatch, dtype, with_bias):
    monkeypatch.setattr(head_module, "CHUNK_ELEMENTS", 7 * 300)  # 7 positions a chunk: 51 = 7 chunks + 2
    g = torch.Generator().manual_seed(1)
    head = nn.Linear(24, 300, bias=with_bias).to(dtype)
    hidden = torch.randn(3, 18, 24, generator=g).to(dtype)
    t = top_k_entry(torch.randn(3, 18, 300, generator=g) * 4, 16)
    grads = []
    for chunked in (False, True):
        h = hidden.clone().requires_grad_(True)
        body = h * 1.5  # a graph before the head, as the decoder blocks are
        if chunked:
            value = ChunkedHeadLoss.apply(body[:, :-1].reshape(-1, 24), head.weight, head.bias, kl_per_position,
                                          t.top_logp.flatten(0, 1), t.top_idx.flatten(0, 1), t.rest_logp.flatten())
        else:
            value = kl_to_teacher(head(body), t.top_logp, t.top_idx, t.rest_logp)
        (value * 2).backward()  # the loss scale reaches the hidden states' gradient
        grads.append((value.detach(), h.grad))
    assert grads[1][0].dtype == torch.float32 and grads[1][1].dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(grads[1][0], grads[0][0], **tol)
    torch.testing.assert_close(grads[1][1], grads[0][1], **tol)
    assert grads[1][1][:, -1].abs().max() == 0  # the last position predicts nothing the teacher holds


@pytest.mark.parametrize("arch", ARCHS)
def test_student_kl_through_the_chunked_head_has_the_same_loss_and_gradients(monkeypatch, arch):
    monkeypatch.setattr(head_module, "CHUNK_ELEMENTS", 5 * 128)
    model = tiny_model(arch)
    windows = random_windows(4, 16)
    teacher = teacher_cache(model, windows, 8, 2)
    split = head_split(model, windows[:1, :8])
    assert split is not None and split[1] is model.get_output_embeddings()
    for p in model.parameters():
        p.requires_grad_(p is not model.get_output_embeddings().weight)  # the head stays frozen, as in training
    results = []
    for s in (None, split):
        model.zero_grad(set_to_none=True)
        value = student_kl(model, windows, teacher.top_logp, teacher.top_idx, teacher.rest_logp, s)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[1][1].keys() == results[0][1].keys() and results[0][1]
    for n, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_teacher_cache_and_perplexity_through_the_chunked_head_equal_the_whole_logits(monkeypatch, arch):
    monkeypatch.setattr(head_module, "CHUNK_ELEMENTS", 9 * 128)  # 3 chunks a window, one across two windows
    model = tiny_model(arch)
    windows = random_windows(5, 12)

    def both(fn):
        chunked = fn()
        with monkeypatch.context() as m:
            for module in (teacher_module, soco_llm.eval.perplexity):
                m.setattr(module, "head_split", lambda *a: None)
            return chunked, fn()

    chunked, whole = both(lambda: teacher_cache(model, windows, 8, 2))
    for name in ("top_logp", "top_idx", "rest_logp", "windows"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-6)
    dense = soco_llm.perplexity(model, windows, batch_size=2, keep_topk=8)
    other = tiny_model(arch, seed=1)
    chunked, whole = both(lambda: soco_llm.perplexity(other, windows, batch_size=2, reference=dense.kept, keep_topk=8))
    assert chunked.perplexity == pytest.approx(whole.perplexity, rel=1e-5) and chunked.tokens == whole.tokens == 55
    assert chunked.kl == pytest.approx(whole.kl, rel=1e-5) and chunked.kl > 0
    torch.testing.assert_close(chunked.kept.top_logp, whole.kept.top_logp, rtol=1e-5, atol=1e-6)


def test_the_whole_logits_where_the_head_is_not_a_plain_frozen_linear(monkeypatch):
    windows = random_windows(2, 16)
    config = tiny_config("gemma3")
    config.final_logit_softcapping = 5.0  # logits = 5·tanh(head(h) / 5): not the head's output
    capped = AutoModelForCausalLM.from_config(config).eval()
    assert head_split(capped, windows[:1, :8]) is None
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert head_split(meta, windows[:1, :8].to("meta")) is None

    model = tiny_model("llama").requires_grad_(False)
    teacher = teacher_cache(model, windows, 8, 2)
    calls = []
    monkeypatch.setattr(teacher_module, "kl_to_teacher", lambda *a: calls.append(1) or kl_to_teacher(*a))
    loss = kl_batch_loss(model, windows, teacher, 2)
    loss(torch.Generator().manual_seed(0), 0, 1)
    assert calls == []  # a frozen plain head: chunked
    model.lm_head.weight.requires_grad_(True)  # a trained head needs its own gradient: the whole logits
    loss(torch.Generator().manual_seed(0), 0, 1).backward()
    assert calls == [1] and model.lm_head.weight.grad is not None
