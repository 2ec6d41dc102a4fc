"""The chunked output head's KL (core/teacher.py): the same loss and gradient as the whole logits' KL, and the
plain path wherever the model's logits are not its head applied to its hidden states."""

import pytest
import torch
from torch import nn

import soco_llm.core.teacher as teacher_module
from soco_llm.core.teacher import ChunkedHeadKL, kl_batch_loss, kl_to_teacher, student_kl, teacher_cache, top_k_entry
from tiny import ARCHS, random_windows, tiny_config, tiny_model


def _teacher(batch, length, vocab, k=16):
    return top_k_entry(torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(0)) * 4, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_kl_equals_the_whole_logits_kl_in_value_and_gradient(monkeypatch, dtype, with_bias):
    monkeypatch.setattr(teacher_module, "CHUNK_ELEMENTS", 7 * 300)  # 7 positions a chunk: 51 = 7 chunks + 2
    g = torch.Generator().manual_seed(1)
    head = nn.Linear(24, 300, bias=with_bias).to(dtype)
    hidden = torch.randn(3, 18, 24, generator=g).to(dtype)
    t = _teacher(3, 18, 300)
    grads = []
    for fused in (False, True):
        h = hidden.clone().requires_grad_(True)
        body = h * 1.5  # a graph before the head, as the decoder blocks are
        if fused:
            value = ChunkedHeadKL.apply(body[:, :-1], head.weight, head.bias, t.top_logp, t.top_idx, t.rest_logp)
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
def test_student_kl_takes_the_chunked_head_with_the_same_loss_and_gradients(monkeypatch, arch):
    monkeypatch.setattr(teacher_module, "CHUNK_ELEMENTS", 5 * 128)
    model = tiny_model(arch)
    windows = random_windows(4, 16)
    teacher = teacher_cache(model, windows, 8, 2)
    split = teacher_module._head_split(model, windows[:1, :8])
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


def test_the_plain_path_where_the_head_is_not_a_plain_frozen_linear(monkeypatch):
    from transformers import AutoModelForCausalLM

    windows = random_windows(2, 16)
    config = tiny_config("gemma3")
    config.final_logit_softcapping = 5.0  # logits = 5·tanh(head(h) / 5): not the head's output
    capped = AutoModelForCausalLM.from_config(config).eval()
    assert teacher_module._head_split(capped, windows[:1, :8]) is None
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert teacher_module._head_split(meta, windows[:1, :8].to("meta")) is None

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
