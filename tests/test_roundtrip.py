"""Compress -> save -> load gives identical logits on every listed architecture."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import soco_llm
from soco_llm import LowRankLinear
from soco_llm.io.format import FORMAT_VERSION
from tiny import ARCHS, random_windows, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_identical_logits(arch, tmp_path):
    model = tiny_model(arch)
    x = random_windows()
    report = soco_llm.compress(model, soco_llm.SVDLLMConfig(ratio=0.4), x)
    ref = model(input_ids=x).logits
    out = soco_llm.save_compressed(model, tiny_tokenizer(), tmp_path / "c", report)

    loaded = soco_llm.load(out)
    assert torch.equal(loaded(input_ids=x).logits, ref)
    n_lowrank = sum(isinstance(m, LowRankLinear) for m in loaded.modules())
    assert n_lowrank == sum(1 for r in report.layers if r["rank"] > 0) > 0
    # No dense copy of a compressed layer was materialised.
    assert not any(n.endswith(r["name"] + ".weight") for n, _ in loaded.named_parameters() for r in report.layers
                   if r["rank"] > 0)

    # Plain from_pretrained, even after `import soco_llm`, refuses (naming the fix) rather than load random factors.
    with pytest.raises(ValueError, match=r"soco_llm\.load\(folder\)"):
        AutoModelForCausalLM.from_pretrained(out)

    cfg = json.loads((out / "config.json").read_text())["compression"]
    assert cfg["format_version"] == FORMAT_VERSION and cfg["method"] == "svd-llm"
    assert cfg["ranks"] == report.ranks and "ratio_definition" in cfg

    dense_dir = soco_llm.export_dense(out, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert "compression" not in json.loads((dense_dir / "config.json").read_text())
    torch.testing.assert_close(dense(input_ids=x).logits, ref, atol=1e-4, rtol=1e-4)


def test_repr_shows_rank():
    layer = LowRankLinear(16, 8, 3)
    assert "rank=3" in repr(layer)


def test_merged_and_factored_paths_agree():
    torch.manual_seed(0)
    layer = LowRankLinear.from_factors(torch.randn(3, 16), torch.randn(8, 3), torch.randn(8))
    x = torch.randn(2, 5, 16)
    factored = layer(x)
    layer.merge_min_tokens = 1
    torch.testing.assert_close(layer(x), factored, atol=1e-5, rtol=1e-5)


def test_save_refuses_existing_folder(tmp_path):
    model = tiny_model("llama")
    report = soco_llm.compress(model, soco_llm.SVDConfig(ratio=0.4))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("user data")
    with pytest.raises(soco_llm.SocoError, match="already exists"):
        soco_llm.save_compressed(model, None, tmp_path / "c", report)
    assert (tmp_path / "c" / "keep.txt").read_text() == "user data"
    soco_llm.save_compressed(model, None, tmp_path / "c", report, overwrite=True)
    assert not (tmp_path / "c" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_reloads_as_saved(dtype, tmp_path):
    """`.to(dtype)` leaves the config's dtype as it was; the saved config names the weights' dtype, so loading
    "as saved" (the CLI's default) gives the same dtype and logits, for a compressed and a dense folder."""
    from soco_llm.models import load_model

    model = tiny_model("llama").to(dtype)
    x = random_windows()
    report = soco_llm.compress(model, soco_llm.SVDConfig(ratio=0.4))
    ref = model(input_ids=x).logits
    compressed = soco_llm.save_compressed(model, tiny_tokenizer(), tmp_path / "c", report)
    assert json.loads((compressed / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    for loaded in (soco_llm.load(compressed), load_model(str(compressed))[0]):
        assert next(loaded.parameters()).dtype == dtype
        # not bit for bit: `.to(dtype)` also rounded the rotary inv_freq buffer, which loading recomputes
        torch.testing.assert_close(loaded(input_ids=x).logits, ref, atol=2e-2, rtol=2e-2)
    dense = soco_llm.save_dense(tiny_model("llama").to(dtype), tiny_tokenizer(), tmp_path / "d")
    assert next(load_model(str(dense))[0].parameters()).dtype == dtype
