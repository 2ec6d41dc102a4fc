"""SoCo on tiny random models: init, training, the cut, folding, resume, errors, export."""

import json

import pytest
import torch

import soco_llm
from soco_llm import SocoError, SoCoConfig
from soco_llm.core.adapter import find_targets
from soco_llm.core.budget import global_cut
from soco_llm.methods.soco.basis import decompose_targets
from soco_llm.learned.cut import cut, kept_components, set_masks
from soco_llm.learned.size import SizeModel
from soco_llm.learned.spectral import GateState, install_spectral
from soco_llm.core.teacher import kl_to_teacher, teacher_cache
from soco_llm.methods.soco.whole_model import train
from tiny import random_windows, tiny_model


def _spectral(cfg, arch="llama", n=16):
    model = tiny_model(arch)
    windows = random_windows(n, 32)
    targets = find_targets(model)
    teacher = teacher_cache(model, windows, cfg.teacher_topk, 4)
    basis = decompose_targets(model, cfg, targets, windows)
    gate = GateState()
    layers = install_spectral(model, targets, basis, gate)
    return model, windows, teacher, layers, gate


def _mean_kl(model, windows, teacher):
    with torch.no_grad():
        return float(kl_to_teacher(model(input_ids=windows).logits, teacher.top_logp, teacher.top_idx, teacher.rest_logp))


@pytest.mark.parametrize("basis", ["whitened", "plain"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_equals_dense(arch, basis):
    dense = tiny_model(arch)
    x = random_windows()
    ref = dense(input_ids=x).logits
    model, *_ = _spectral(SoCoConfig(ratio=0.4, basis=basis, cap_basis=False), arch)
    torch.testing.assert_close(model(input_ids=x).logits, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("straight_through", ["all", "off"])
def test_few_steps_lower_the_kl(straight_through):
    cfg = SoCoConfig(ratio=0.5, steps=15, stage_steps=[0, 15, 0], alternate_amplitude=0.0, lr_scores=2e-2,
                     lr_bias=2e-3, batch_size=8, straight_through=straight_through)
    model, windows, teacher, layers, gate = _spectral(cfg)
    size = SizeModel(layers, cfg.deviation)

    def trained_model_kl():  # the model the run optimises: hard cut (straight-through) or soft gates
        gate.temperature = cfg.temperature
        gate.log_theta = size.solve_threshold((1 - cfg.ratio) * size.dense, cfg.temperature)
        gate.hard = straight_through == "all"
        set_masks(layers, kept_components(layers, cfg.ratio, cfg.deviation))
        kl = _mean_kl(model, windows, teacher)
        gate.hard = False
        return kl

    before = trained_model_kl()
    history = train(model, layers, gate, windows, teacher, cfg, None)
    after = trained_model_kl()
    assert after < 0.9 * before
    assert all(abs(h["soft_ratio"] - 0.5) < 0.01 for h in history)  # the budget is held every step


@pytest.mark.parametrize("ratio", [0.2, 0.45, 0.7])
def test_cut_meets_budget_exactly(ratio):
    model = tiny_model("llama")
    report = soco_llm.compress(model, SoCoConfig(ratio=ratio, steps=6, batch_size=4), random_windows(8, 32), heal_config=soco_llm.HealConfig())
    old = sum(r["dense_params"] for r in report.layers)
    new = sum(r["params"] for r in report.layers)
    assert report.achieved_ratio == pytest.approx(1 - new / old)
    max_component = max(r["out_features"] + r["in_features"] for r in report.layers)
    assert ratio - 1e-12 <= report.achieved_ratio <= ratio + max_component / old
    # d counts: every compressed layer pays m for its bias
    assert all(r["params"] == r["rank"] * (r["out_features"] + r["in_features"]) + r["out_features"]
               for r in report.layers)


def test_folding_scores_changes_no_logits():
    cfg = SoCoConfig(ratio=0.4, steps=10, batch_size=4)
    model, windows, teacher, layers, gate = _spectral(cfg)
    train(model, layers, gate, windows, teacher, cfg, None)
    shapes = {n: (l.out_features, l.in_features) for n, l in layers.items()}
    old = sum(m * n for m, n in shapes.values())
    kept = global_cut({n: l.importance() for n, l in layers.items()}, shapes, int((1 - cfg.ratio) * old), cfg.deviation)
    with torch.no_grad():  # the hard-gated spectral model: dropped components zeroed, gates open
        for name, l in layers.items():
            mask = torch.zeros_like(l.scores)
            mask[kept[name]] = 1
            l.scores.mul_(mask)
        gate.log_theta = float("-inf")
        hard = model(input_ids=windows).logits
    with torch.no_grad():  # restore importance order is unaffected: zeroed ones were not kept anyway
        rows = cut(model, layers, cfg.ratio, cfg.deviation)
        folded = model(input_ids=windows).logits
    assert {r.name: r.rank for r in rows} == {n: int(k.sum()) for n, k in kept.items()}
    torch.testing.assert_close(folded, hard, atol=1e-4, rtol=1e-4)


def test_straight_through_stage_trains_the_model_that_is_saved():
    cfg = SoCoConfig(ratio=0.4, steps=8, stage_steps=[2, 2, 4], batch_size=4)
    model, windows, teacher, layers, gate = _spectral(cfg)
    train(model, layers, gate, windows, teacher, cfg, None)
    size = SizeModel(layers, cfg.deviation)
    gate.temperature = cfg.final_temperature
    gate.log_theta = size.solve_threshold((1 - cfg.ratio) * size.dense, gate.temperature)
    gate.hard = True
    set_masks(layers, kept_components(layers, cfg.ratio, cfg.deviation))
    for l in layers.values():
        l.scores.requires_grad_(True)
    trained = model(input_ids=windows).logits  # what stage 3 optimises
    trained.float().pow(2).mean().backward()
    dropped = [l.scores.grad[l.mask == 0] for l in layers.values()]
    assert any(g.abs().sum() > 0 for g in dropped)  # dropped components still get a gradient (straight-through)
    gate.hard = False
    with torch.no_grad():
        cut(model, layers, cfg.ratio, cfg.deviation)
        torch.testing.assert_close(model(input_ids=windows).logits, trained.detach(), atol=1e-4, rtol=1e-4)


def _run(tmp_path, name, **kw):
    model = tiny_model("llama")
    cfg = SoCoConfig(ratio=0.4, steps=12, batch_size=4, checkpoint_every=3, run_dir=str(tmp_path / name), **kw)
    soco_llm.compress(model, cfg, random_windows(12, 32), heal_config=soco_llm.HealConfig())
    return model


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import soco_llm.core.teacher as soco

    full = _run(tmp_path, "full")
    real = soco.student_kl
    calls = {"n": 0}

    def interrupt_at_step_8(*a):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(soco, "student_kl", interrupt_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "cut")
    assert json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["step"] == 7
    monkeypatch.setattr(soco, "student_kl", real)
    resumed = _run(tmp_path, "cut", resume=True)
    a = load_file(str(tmp_path / "full" / "soco_scores.safetensors"))
    b = load_file(str(tmp_path / "cut" / "soco_scores.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    x = random_windows()
    torch.testing.assert_close(full(input_ids=x).logits, resumed(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import soco_llm.core.teacher as soco

    real = soco.student_kl
    calls = {"n": 0}

    def nan_at_step_5(*a):
        calls["n"] += 1
        return real(*a) * (float("nan") if calls["n"] == 5 else 1.0)

    monkeypatch.setattr(soco, "student_kl", nan_at_step_5)
    with pytest.raises(SocoError, match="NaN"):
        _run(tmp_path, "nan")
    assert json.loads((tmp_path / "nan" / "checkpoint.json").read_text())["step"] == 3


@pytest.mark.parametrize("dtype,hint", [(torch.float16, True), (torch.float32, False)])
def test_a_nan_loss_in_float16_suggests_bfloat16(monkeypatch, dtype, hint):
    import soco_llm.core.teacher as soco

    real = soco.student_kl
    monkeypatch.setattr(soco, "student_kl", lambda *a: real(*a) * float("nan"))
    with pytest.raises(SocoError, match="NaN") as e:
        soco_llm.compress(tiny_model("llama").to(dtype), SoCoConfig(ratio=0.4, steps=2, batch_size=4),
                          random_windows(8, 32), heal_config=soco_llm.HealConfig())
    assert ("--dtype bfloat16" in str(e.value)) == hint


def test_run_dir_is_not_reused_without_resume(tmp_path):
    _run(tmp_path, "r")
    with pytest.raises(SocoError, match="--resume"):
        _run(tmp_path, "r")


@pytest.mark.parametrize("kw,match", [
    (dict(steps=10, stage_steps=[3, 3, 3]), "adding up"),
    (dict(basis="fancy"), "basis"),
])
def test_bad_config_is_a_clear_error(kw, match):
    with pytest.raises(SocoError, match=match):
        soco_llm.config_for("soco", ratio=0.4, **kw)


def test_unreachable_ratio_is_a_clear_error():
    with pytest.raises(SocoError, match="out of reach"):
        soco_llm.compress(tiny_model("llama"), SoCoConfig(ratio=0.97, steps=2), random_windows(4, 32), heal_config=soco_llm.HealConfig())


def test_export_other_ratio_from_one_run(tmp_path, model_dir):
    model, tok = soco_llm.load_model(str(model_dir))
    cfg = SoCoConfig(ratio=0.4, steps=6, batch_size=4, run_dir=str(tmp_path / "run"))
    report = soco_llm.compress(model, cfg, random_windows(8, 32), heal_config=soco_llm.HealConfig())
    out = soco_llm.save_compressed(model, tok, tmp_path / "c", report)
    assert (out / "soco_scores.safetensors").is_file()
    loaded = soco_llm.load(out)
    x = random_windows()
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)
    ranks = {}
    for ratio in (0.3, 0.6):
        m2, _, r2 = soco_llm.export_from_run(tmp_path / "run", ratio)
        assert ratio - 1e-12 <= r2.achieved_ratio < ratio + 0.05
        ranks[ratio] = sum(r2.ranks.values())
    assert ranks[0.3] > ranks[0.6]
    m3, _, r3 = soco_llm.export_from_run(tmp_path / "run", 0.4)
    assert r3.ranks == report.ranks
    torch.testing.assert_close(m3(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_sequential_basis_whitens_on_the_cut_earlier_blocks_and_restores_the_model():
    from soco_llm.core.layer import LowRankLinear

    model = tiny_model("llama")
    windows = random_windows(8, 32)
    bases = {}
    for sequential in (False, True):
        cfg = soco_llm.SoCoConfig(ratio=0.6, sequential=sequential, whiten_samples=8, batch_size=4)
        targets = find_targets(model, cfg.target_modules, cfg.exclude_modules)
        bases[sequential] = decompose_targets(model, cfg, targets, windows)
        assert not any(isinstance(m, LowRankLinear) for m in model.modules())  # the dense layers are back
    first = [n for n in bases[False] if ".layers.0." in n]
    later = [n for n in bases[False] if ".layers.1." in n]
    for n in first:  # block 0 sees the same inputs either way
        torch.testing.assert_close(bases[True][n]["sigma"], bases[False][n]["sigma"])
    assert any(not torch.allclose(bases[True][n]["sigma"], bases[False][n]["sigma"]) for n in later)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_hard_cut_forward_on_kept_components_equals_the_masked_product(dtype, tol):
    """On the CPU the straight-through forward multiplies only the kept components (KeptProduct); its output and
    the gradients of x, scores and d equal the full masked product's (the GPU path), cut components included."""
    from soco_llm.learned.spectral import GateState, SpectralLinear

    g = torch.Generator().manual_seed(0)
    m, n, k = 12, 10, 8
    left, right = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    sigma, bias = torch.rand(k, generator=g).to(dtype) + 0.5, torch.randn(m, generator=g).to(dtype)
    gate = GateState(log_theta=torch.tensor(0.1), temperature=0.3, hard=True)
    layer = SpectralLinear(left, sigma, right, torch.rand(k, generator=g) + 0.5, bias, gate)
    with torch.no_grad():
        layer.scores.copy_(torch.rand(k, generator=g) + 0.5)
        layer.deviation.copy_(torch.randn(m, generator=g))
        layer.mask.copy_((torch.rand(k, generator=g) > 0.4).float())
    assert 0 < layer.mask.sum() < k
    x0 = torch.randn(3, 5, n, generator=g).to(dtype)
    grad_out = torch.randn(3, 5, m, generator=g).to(dtype)

    def run(kept_only):
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        # off: the path every other device takes, the full product with the 0/1 mask in the gate
        layer.kept_only_on_cpu = kept_only
        layer(x).backward(grad_out)
        return layer(x).detach(), x.grad, layer.scores.grad.clone(), layer.deviation.grad.clone()

    kept, full = run(True), run(False)
    for a, b in zip(kept, full):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
    cut = layer.mask == 0
    assert (full[2][cut] != 0).all() and (kept[2][cut] != 0).all()  # cut components still get a gradient



def test_whitened_basis_fits_half_precision_and_the_cut_is_unchanged():
    """Σ xᵀx over many tokens makes the whitened σ grow with √rows (past fp16's 65504 on the default model);
    the basis stores σ / c and c·A₀ (c a power of two), so an fp16 layer stays finite, and the true σ is
    folded back at the cut: in float32 the stored tensors are the unscaled ones times an exact power of two."""
    import copy

    from soco_llm.core.adapter import Target
    from soco_llm.core.decompose import whitened_basis
    from soco_llm.core.stats import LayerStats
    from soco_llm.methods.soco.basis import basis_entry, half_precision_scale
    from soco_llm.learned.spectral import SpectralLinear

    assert [half_precision_scale(r) for r in (1, 4, 16384, 20000, 2 ** 24)] == [1.0, 2.0, 128.0, 128.0, 4096.0]
    g = torch.Generator().manual_seed(0)
    m, n, rows = 24, 32, 2 ** 24
    dense = torch.nn.Linear(n, m, bias=False)
    x = 30 * torch.randn(512, n, generator=g, dtype=torch.float64)
    stats = LayerStats(xtx=rows / 512 * (x.T @ x), rows=rows)  # as if 2^24 tokens of that spread
    cfg = SoCoConfig(ratio=0.4, cap_basis=False)
    unscaled = whitened_basis(dense.weight, stats.xtx, "w")
    assert unscaled.sigma.max() > 65504  # inf in fp16 unscaled

    half = basis_entry(Target("w", 0, copy.deepcopy(dense).half()), cfg, stats)
    assert float(half["scale"]) == 4096.0 and torch.isfinite(half["sigma"]).all()
    layer = SpectralLinear(half["left"], half["sigma"], half["right"], half["prior"], None, GateState(),
                           scale=half["scale"])
    xs = x[:8].to(torch.float16)
    ref = torch.nn.functional.linear(xs.double(), dense.weight.double())  # outputs up to about 40
    with torch.no_grad():
        torch.testing.assert_close(layer(xs).double(), ref, atol=0.1, rtol=1e-2)
    torch.testing.assert_close(layer.spectrum(), half["sigma"].double() * 4096)

    single = basis_entry(Target("w", 0, dense), cfg, stats)
    assert torch.equal(single["sigma"] * 4096, unscaled.sigma.float())
    assert torch.equal(single["right"] / 4096, unscaled.right.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_soco_in_half_precision_keeps_what_float32_keeps(dtype):
    """A whole SoCo run in a half-precision model: finite logits, and the cut's ranks (learned from a score
    gradient computed in half precision) within a few components per layer of the float32 run's."""
    ranks = {}
    for dt in (torch.float32, dtype):
        model = tiny_model("llama").to(dt)
        report = soco_llm.compress(model, SoCoConfig(ratio=0.4, steps=6, batch_size=4), random_windows(8, 32), heal_config=soco_llm.HealConfig())
        ranks[dt] = torch.tensor([float(r["rank"]) for r in report.layers])
        logits = model(input_ids=random_windows(2, 16)).logits
        assert logits.dtype == dt and torch.isfinite(logits.float()).all()
    assert (ranks[dtype] - ranks[torch.float32]).abs().mean() <= 0.5
