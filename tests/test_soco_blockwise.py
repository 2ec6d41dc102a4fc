"""Block-wise SoCo (bounded memory) on tiny random models: budget per block, learning, resume, export error."""

import pytest
import torch

import soco_llm
from soco_llm import SocoError, SoCoConfig
from soco_llm.core.adapter import find_targets
from soco_llm.core.stats import BlockRunner
from soco_llm.methods.soco.basis import basis_entry
from soco_llm.methods.soco.blockwise import block_loss
from soco_llm.learned.size import SizeModel
from soco_llm.learned.spectral import GateState, install_spectral
from soco_llm.methods.soco.train import train_scores
from tiny import random_windows, tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_block_meets_its_budget(arch):
    model = tiny_model(arch)
    report = soco_llm.compress(model, SoCoConfig(ratio=0.4, blockwise=True, steps=6, batch_size=4),
                               random_windows(8, 32))
    blocks = {}
    for r in report.layers:
        blk = r["name"].split(".h." if arch == "gpt2" else ".layers.")[1].split(".")[0]
        old, new = blocks.get(blk, (0, 0))
        blocks[blk] = (old + r["dense_params"], new + r["params"])
    for old, new in blocks.values():
        assert 0.4 - 1e-9 <= 1 - new / old < 0.4 + 0.1  # within one component of the block's budget
    x = random_windows(2, 16)
    assert torch.isfinite(model(input_ids=x).logits).all()
    assert all(type(m).__name__ != "SpectralLinear" for m in model.modules())


def test_training_lowers_the_block_error():
    cfg = SoCoConfig(ratio=0.5, steps=20, stage_steps=[0, 20, 0], alternate_amplitude=0.0, lr_scores=2e-2,
                     lr_bias=2e-3, batch_size=4, straight_through="off")  # the soft model is what trains
    model = tiny_model("llama")
    targets = find_targets(model)
    runner = BlockRunner(model, targets, list(random_windows(16, 32).split(4)))
    errors = []

    def on_block(i, block, stats):
        if i:
            return
        gate = GateState()
        layers = install_spectral(model, [t for t in targets if t.block == 0],
                                  {t.name: basis_entry(t, cfg, stats[t.name]) for t in targets if t.block == 0}, gate)
        loss = block_loss(block, runner.block_inputs, runner.block_outputs)
        size = SizeModel(layers, cfg.deviation)

        def mean_error():
            gate.temperature = cfg.temperature
            gate.log_theta = size.solve_threshold((1 - cfg.ratio) * size.dense, cfg.temperature)
            return sum(float(loss(torch.Generator().manual_seed(j), 0, 1)) for j in range(8)) / 8

        errors.append(mean_error())
        with torch.enable_grad():
            train_scores(layers, gate, loss, cfg, None)
        errors.append(mean_error())

    runner.run(on_block, {"xtx"})
    assert errors[1] < 0.9 * errors[0]


def test_blockwise_resume_matches_uninterrupted(tmp_path, monkeypatch):
    import soco_llm.methods.soco.blockwise as bw

    windows = random_windows(8, 32)

    def run(name):
        model = tiny_model("llama")
        cfg = SoCoConfig(ratio=0.4, blockwise=True, steps=5, batch_size=4, run_dir=str(tmp_path / name), resume=True)
        soco_llm.compress(model, cfg, windows)
        return model

    full = run("full")
    real, calls = bw.train_scores, {"n": 0}

    def crash_on_second_block(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(bw, "train_scores", crash_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        run("part")
    monkeypatch.setattr(bw, "train_scores", real)
    assert sorted(p.name for p in (tmp_path / "part").glob("block-*")) == ["block-0000.safetensors"]
    resumed = run("part")
    x = random_windows(2, 16)
    torch.testing.assert_close(resumed(input_ids=x).logits, full(input_ids=x).logits)
    with pytest.raises(SocoError, match="blockwise run"):
        soco_llm.export_from_run(tmp_path / "full", 0.5)
