"""Device and dtype mistakes made visible on a CPU-only machine.

A model on the `meta` device has no data: any tensor SoCo creates on the CPU instead of beside
its layer, and any host sync (`.item()`, `float(t)`, `if t:`) in the per-step threshold solve or
gates, raises. bf16 runs check that every method works end to end in a half-precision model.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import soco_llm
from soco_llm.core.adapter import find_targets
from soco_llm.core.layer import LowRankLinear
from soco_llm.methods.soco.basis import basis_entry
from soco_llm.learned.size import SizeModel
from soco_llm.learned.spectral import GateState, SpectralLinear, install_spectral
from tiny import random_windows, tiny_config, tiny_model


def _meta_spectral_model():
    """A tiny Llama on `meta` with SoCo's layers installed over a basis moved to `meta` (basis maths need data)."""
    cfg = soco_llm.SoCoConfig(ratio=0.4, basis="plain")
    cpu_targets = find_targets(tiny_model("llama"))
    basis = {t.name: {k: v.to("meta") for k, v in basis_entry(t, cfg, None).items()} for t in cpu_targets}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    gate = GateState()
    layers = install_spectral(model, find_targets(model), basis, gate)
    return model, layers, gate, cfg


def test_spectral_layers_keep_everything_on_their_device():
    model, layers, gate, cfg = _meta_spectral_model()
    for name, layer in layers.items():
        for what, t in [*layer.named_parameters(), *layer.named_buffers()]:
            assert t.device.type == "meta", f"{name}.{what} is on {t.device}"
    assert all(p.device.type == "meta" for p in model.parameters())


def test_threshold_solve_gates_and_forward_need_no_host_sync():
    _, layers, gate, cfg = _meta_spectral_model()
    size = SizeModel(layers, cfg.deviation)
    assert size.cost.device.type == "meta"
    gate.log_theta = size.solve_threshold(0.6 * size.dense, cfg.temperature)  # raises on any host sync
    assert isinstance(gate.log_theta, torch.Tensor) and gate.log_theta.device.type == "meta"
    layer = next(iter(layers.values()))
    assert layer.soft_gate().device.type == "meta" and size.soft().device.type == "meta"
    gate.hard = True
    y = layer(torch.empty(2, 3, layer.in_features, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 3, layer.out_features)


@pytest.mark.parametrize("method", ["svd", "svd-llm", "soco"])
def test_methods_run_end_to_end_in_bf16(method):
    model = tiny_model("llama").to(torch.bfloat16)
    settings = dict(steps=4, batch_size=4) if method == "soco" else {}
    report = soco_llm.compress(model, soco_llm.config_for(method, ratio=0.4, **settings), random_windows(8, 32), heal_config=soco_llm.HealConfig())
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert lowrank and all(m.A.weight.dtype == m.B.weight.dtype == torch.bfloat16 for m in lowrank)
    assert not any(isinstance(m, SpectralLinear) for m in model.modules())
    assert 0.4 - 1e-9 <= report.achieved_ratio < 0.5
    logits = model(input_ids=random_windows(2, 16)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_running_out_of_memory_names_the_phase_and_the_setting(monkeypatch):
    import soco_llm.methods.soco.whole_model as whole_model

    def no_memory(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(whole_model, "teacher_cache", no_memory)
    with pytest.raises(soco_llm.SocoError, match=r"out of CPU memory during teacher; lower --batch-size"):
        soco_llm.compress(tiny_model("llama"), soco_llm.SoCoConfig(ratio=0.4, steps=2), random_windows(4, 32), heal_config=soco_llm.HealConfig())


def test_soco_reports_the_time_of_each_phase():
    report = soco_llm.compress(tiny_model("llama"), soco_llm.SoCoConfig(ratio=0.4, steps=2, batch_size=4),
                               random_windows(4, 32), heal_config=soco_llm.HealConfig())
    assert set(report.config["phases"]["seconds"]) == {"teacher", "basis", "training", "cut"}
