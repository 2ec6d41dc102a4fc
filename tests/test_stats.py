"""Block-wise statistics equal whole-model statistics; sequential mode feeds compressed outputs."""

import pytest
import torch

import soco_llm
from soco_llm.core.adapter import find_targets
from soco_llm.core.stats import BlockRunner
from tiny import ARCHS, random_windows, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_blockwise_xtx_matches_whole_model_hooks(arch):
    model = tiny_model(arch)
    x = random_windows(n=6, seq_len=16)
    targets = find_targets(model)
    # Reference: hooks on every target during ordinary whole-model forwards.
    ref = {t.name: 0 for t in targets}
    handles = [t.module.register_forward_hook(
        lambda mod, inp, out, n=t.name: ref.__setitem__(n, ref[n] + (lambda v: v.T @ v)(inp[0].reshape(-1, inp[0].shape[-1]).double())))
        for t in targets]
    with torch.no_grad():
        for b in x.split(2):
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    got = {}
    BlockRunner(model, targets, list(x.split(2))).run(lambda i, blk, stats: got.update(stats), {"xtx", "abs_mean"})
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name].xtx, ref[name], rtol=1e-4, atol=1e-3)
        assert got[name].rows == 6 * 16


def test_sequential_mode_changes_later_statistics():
    x = random_windows()
    plain, seq = tiny_model("llama"), tiny_model("llama")
    r1 = soco_llm.compress(plain, soco_llm.SVDLLMConfig(ratio=0.6), x)
    r2 = soco_llm.compress(seq, soco_llm.SVDLLMConfig(ratio=0.6, sequential=True), x)
    assert r1.ranks == r2.ranks
    a = plain.model.layers[0].self_attn.q_proj.A.weight
    assert torch.equal(a, seq.model.layers[0].self_attn.q_proj.A.weight)  # block 0 sees the same inputs
    assert not torch.equal(plain.model.layers[1].self_attn.q_proj.A.weight, seq.model.layers[1].self_attn.q_proj.A.weight)


def test_nan_activations_fail_clearly():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("nan")
    with pytest.raises(soco_llm.SocoError, match="NaN or inf in the inputs of model.layers.0.mlp"):
        soco_llm.compress(model, soco_llm.SVDLLMConfig(ratio=0.4), random_windows())


def test_target_and_exclude_modules():
    model = tiny_model("llama")
    report = soco_llm.compress(model, soco_llm.SVDConfig(ratio=0.4, target_modules=["mlp.*"], exclude_modules=["down_proj"]))
    assert {r["name"].split(".")[-1] for r in report.layers} == {"gate_proj", "up_proj"}
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    with pytest.raises(soco_llm.SocoError, match="no target linear layers"):
        soco_llm.compress(tiny_model("llama"), soco_llm.SVDConfig(ratio=0.4, target_modules=["nothing_like_this"]))
