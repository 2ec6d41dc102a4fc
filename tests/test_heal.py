"""Healing after the cut on tiny models: it lowers the KL, keeps ranks and ratio, resumes exactly, saves and loads."""

import pytest
import torch

import soco_llm
import soco_llm.core.teacher as teacher_module
from soco_llm.core.layer import LowRankLinear
from soco_llm.core.teacher import kl_to_teacher, teacher_cache
from soco_llm.heal import HealConfig, heal, heal_checkpoint_step, step_lr
from tiny import random_windows, tiny_model, tiny_tokenizer, top_k_entry


def _compressed(ratio=0.6):
    model = tiny_model("llama")
    windows = random_windows(16, 32)
    teacher = teacher_cache(model, windows, 32, 4)  # from the dense model, before the cut
    report = soco_llm.compress(model, soco_llm.SVDLLMConfig(ratio=ratio), windows)
    return model, windows, teacher, report


def _kl(model, windows, teacher):
    with torch.no_grad():
        return float(kl_to_teacher(model(input_ids=windows).logits.float(), teacher.top_logp, teacher.top_idx,
                                   teacher.rest_logp))


MODES = [dict(mode="factors"), dict(mode="adapter", adapter_rank=4), dict(mode="factors", schedule="cosine")]
MODE_IDS = ["factors", "adapter", "factors-cosine"]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_healing_lowers_the_kl_and_keeps_ranks_and_ratio(mode):
    model, windows, teacher, report = _compressed()
    shapes = {n: (m.A.weight.shape, m.B.weight.shape) for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    keys = set(model.state_dict())
    before = _kl(model, windows, teacher)
    history = heal(model, teacher, windows, HealConfig(steps=30, lr=3e-3, batch_size=4, **mode))
    assert len(history) == 30
    assert _kl(model, windows, teacher) < 0.8 * before
    assert {n: (m.A.weight.shape, m.B.weight.shape) for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == shapes
    assert set(model.state_dict()) == keys  # adapters merged and gone: plain factors, nothing added
    assert {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == \
        {n: r for n, r in report.ranks.items() if r}
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_interrupted_healing_resumes_to_the_same_factors(tmp_path, monkeypatch, mode):
    def run(name, interrupt_at=None, resume=False):
        model, windows, teacher, _ = _compressed()
        cfg = HealConfig(steps=8, lr=3e-3, checkpoint_every=2, run_dir=str(tmp_path / name), resume=resume, **mode)
        if interrupt_at is not None:
            real, calls = teacher_module.student_kl, {"n": 0}

            def interrupting(*a):
                calls["n"] += 1
                if calls["n"] == interrupt_at:
                    raise KeyboardInterrupt
                return real(*a)

            monkeypatch.setattr(teacher_module, "student_kl", interrupting)
        try:
            heal(model, teacher, windows, cfg)
        finally:
            monkeypatch.undo()
        return model

    full = run("full")
    with pytest.raises(KeyboardInterrupt):
        run("cut", interrupt_at=6)  # the checkpoint after step 4 is kept
    resumed = run("cut", resume=True)
    x = random_windows(2, 16)
    torch.testing.assert_close(resumed(input_ids=x).logits, full(input_ids=x).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_healed_model_saves_and_loads_with_identical_logits(tmp_path, mode):
    model, windows, teacher, report = _compressed(0.4)
    heal(model, teacher, windows, HealConfig(steps=4, lr=3e-3, **mode))
    out = soco_llm.save_compressed(model, tiny_tokenizer(), tmp_path / "healed", report)
    loaded = soco_llm.load(out)
    x = random_windows(2, 16)
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_a_nan_loss_keeps_the_last_good_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    model, windows, teacher, _ = _compressed()
    cfg = HealConfig(steps=6, lr=3e-3, checkpoint_every=2, run_dir=str(tmp_path))
    real, calls = teacher_module.student_kl, {"n": 0}

    def nan_at_step_3(*a):
        calls["n"] += 1
        return real(*a) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(teacher_module, "student_kl", nan_at_step_3)
    with pytest.raises(soco_llm.SocoError, match="NaN/inf at step 3.*last good state: add --resume"):
        heal(model, teacher, windows, cfg)
    monkeypatch.undo()
    assert heal_checkpoint_step(tmp_path) == 2  # the step-4 state (NaN in it) was never written
    model, windows, teacher, _ = _compressed()
    history = heal(model, teacher, windows, HealConfig(steps=6, lr=3e-3, checkpoint_every=2, run_dir=str(tmp_path),
                                                       resume=True))
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6] and all(h["kl"] == h["kl"] for h in history)


def test_resuming_with_the_other_mode_is_a_clear_error(tmp_path):
    model, windows, teacher, _ = _compressed()
    heal(model, teacher, windows, HealConfig(steps=2, lr=3e-3, checkpoint_every=2, run_dir=str(tmp_path)))
    with pytest.raises(soco_llm.SocoError, match="trained with mode 'factors', not 'adapter'"):
        heal(model, teacher, windows, HealConfig(steps=4, mode="adapter", run_dir=str(tmp_path), resume=True))
    assert all(type(m.A.weight) is torch.nn.Parameter for m in model.modules() if isinstance(m, LowRankLinear))


def test_factor_adapters_follow_their_factors_device_and_dtype_and_merge_exactly():
    from soco_llm.core.factor_params import attach_factor_adapters, merge_factor_parametrizations

    layer = LowRankLinear.from_factors(torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(5, 3, dtype=torch.bfloat16))
    meta = LowRankLinear(8, 5, 3, device="meta", dtype=torch.bfloat16)
    params = attach_factor_adapters({"l": layer}, 2, seed=0)
    assert all(p.dtype == torch.float32 for p in params.values())
    assert all(p.device.type == "meta" for p in attach_factor_adapters({"m": meta}, 2, seed=0).values())
    assert meta.A.weight.device.type == "meta" and meta.A.weight.dtype == torch.bfloat16
    with torch.no_grad():
        params["l.A.up"].normal_()
        params["l.B.up"].normal_()
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    y, A, B = layer(x), layer.A.weight.detach().clone(), layer.B.weight.detach().clone()
    merge_factor_parametrizations({"l": layer})
    assert torch.equal(layer.A.weight, A) and torch.equal(layer.B.weight, B) and torch.equal(layer(x), y)
    assert type(layer) is LowRankLinear and type(layer.A.weight) is torch.nn.Parameter and layer.A.weight.dtype == torch.bfloat16


def test_factor_masters_keep_steps_below_bf16_spacing_and_merge_to_the_model_dtype():
    from soco_llm.core.factor_params import attach_factor_masters, merge_factor_parametrizations

    ones = torch.ones(3, 8, dtype=torch.bfloat16)
    layer = LowRankLinear.from_factors(ones.clone(), torch.ones(5, 3, dtype=torch.bfloat16))
    params = attach_factor_masters({"l": layer})
    assert set(params) == {"l.A", "l.B"} and all(p.dtype == torch.float32 for p in params.values())
    with torch.no_grad():
        for _ in range(100):  # each step 1e-4, under bf16's spacing at 1.0 (2^-7): a bf16 factor would stay 1.0
            params["l.A"].add_(1e-4)
    assert torch.equal(layer.A.weight, (ones.float() + 0.01).to(torch.bfloat16))  # the layer reads the master, cast
    merge_factor_parametrizations({"l": layer})
    assert type(layer.A.weight) is torch.nn.Parameter and layer.A.weight.dtype == torch.bfloat16 and layer.A.weight.shape == (3, 8)
    assert torch.equal(layer.A.weight, (ones.float() + 0.01).to(torch.bfloat16)) and not torch.equal(layer.A.weight, ones)
    fp32 = LowRankLinear.from_factors(torch.randn(3, 8), torch.randn(5, 3))
    assert attach_factor_masters({"f": fp32})["f.A"] is fp32.A.weight  # float32 factors train as they are
    meta = LowRankLinear(8, 5, 3, device="meta", dtype=torch.bfloat16)
    assert all(p.device.type == "meta" for p in attach_factor_masters({"m": meta}).values())


def test_a_bf16_model_heals_and_stays_bf16():
    model, windows, teacher, _ = _compressed()
    model.to(torch.bfloat16)
    keys = set(model.state_dict())
    before = _kl(model, windows, teacher)
    heal(model, teacher, windows, HealConfig(steps=30, lr=3e-3, batch_size=4))
    assert _kl(model, windows, teacher) < 0.8 * before
    assert set(model.state_dict()) == keys and all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("kw,match", [(dict(steps=-1), "steps"), (dict(lr=0.0), "lr"), (dict(steps=2.5), "steps"),
                                      (dict(mode="lora"), "mode"), (dict(adapter_rank=0), "adapter_rank"),
                                      (dict(schedule="linear"), "schedule")])
def test_bad_heal_settings_are_one_clear_error(kw, match):
    with pytest.raises(soco_llm.SocoError, match=match):
        HealConfig(**kw).validate()


def test_cosine_schedule_warms_up_peaks_and_decays_to_zero():
    cfg = HealConfig(steps=100, lr=1e-3, schedule="cosine")
    lrs = [step_lr(cfg, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 5) and lrs[4] == pytest.approx(1e-3)  # warm-up: the first 5 % of steps
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then never up again
    assert lrs[-1] < 1e-5 and lrs[52] == pytest.approx(5e-4, rel=0.05)
    assert {step_lr(HealConfig(steps=100, lr=1e-3), s) for s in range(100)} == {1e-3}


def test_healing_an_uncompressed_model_is_a_clear_error():
    model = tiny_model("llama")
    windows = random_windows(4, 32)
    with pytest.raises(soco_llm.SocoError, match="compress it first"):
        heal(model, teacher_cache(model, windows, 8, 4), windows, HealConfig(steps=2))


def test_heldout_kl_is_measured_in_the_perplexity_pass():
    dense = tiny_model("llama")
    windows = random_windows(6, 32)
    ref = soco_llm.perplexity(dense, windows, batch_size=4, keep_topk=32)
    assert ref.kl is None and ref.kept.top_logp.shape == (6, 31, 32) and "kept" not in ref.to_dict()
    same = soco_llm.perplexity(dense, windows, batch_size=3, reference=ref.kept)  # other batching, same KL
    assert abs(same.kl) < 1e-5 and same.perplexity == pytest.approx(ref.perplexity, rel=1e-6)
    model, _, teacher, _ = _compressed()
    out = soco_llm.perplexity(model, windows, batch_size=4, reference=ref.kept)
    assert out.kl == pytest.approx(_kl(model, windows, ref.kept), rel=1e-4) and out.kl > 100 * abs(same.kl)
    with pytest.raises(ValueError, match="other windows"):
        soco_llm.perplexity(model, windows[:4], reference=ref.kept)


def test_the_logsumexp_kl_candidate_equals_the_kl_in_value_and_gradient():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from harness.candidate_kl import logsumexp_kl

    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(3, 17, 500, generator=g) * 4
    t = top_k_entry(teacher_logits, 32)
    grads = []
    for fn in (kl_to_teacher, logsumexp_kl):
        x = (torch.randn(3, 17, 500, generator=torch.Generator().manual_seed(1)) * 4).requires_grad_(True)
        value = fn(x, t.top_logp, t.top_idx, t.rest_logp)
        value.backward()
        grads.append((value.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-8)


def test_compress_runs_the_recipe_the_cli_runs():
    """`compress(model, SoCoConfig())` heals as `soco compress --method soco` does (the config's recipe), on the
    teacher the run trained against; an explicit HealConfig() turns healing off, and SVD-LLM's recipe has none."""
    cfg = soco_llm.SoCoConfig(ratio=0.4, steps=2, batch_size=4)
    report = soco_llm.compress(tiny_model("llama"), cfg, random_windows(8, 32))
    heal_record = report.config["heal"]
    assert (heal_record["steps"], heal_record["lr"]) == (60, 3e-5) and heal_record["final_kl"] is not None
    assert "heal" not in soco_llm.compress(tiny_model("llama"), cfg, random_windows(8, 32), heal_config=HealConfig()).config
    assert "heal" not in soco_llm.compress(tiny_model("llama"), soco_llm.SVDLLMConfig(ratio=0.4), random_windows(8, 32)).config


def test_healing_windows_are_socos_default_training_windows():
    """So a default SoCo run hands healing the teacher it cached, and no second teacher is computed."""
    assert soco_llm.SoCoConfig().teacher_windows() == HealConfig().teacher_windows()
    assert soco_llm.SoCoConfig(blockwise=True).teacher_windows() is None
