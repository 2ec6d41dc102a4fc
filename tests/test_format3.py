"""Issue 24: the factored layer as two nn.Linear, saved format 3 (formats 1 and 2 still load), and int8 / int4
quantization of dense and compressed models: identical logits after save and reload, damaged quantized
folders refused, layouts a rank cannot take refused in one line before any heavy work."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import soco_llm
from soco_llm import LowRankLinear, SocoError
from soco_llm.io import check_folder
from soco_llm.io.format import FACTORED_WEIGHTS
from soco_llm.models import load_model
from soco_llm.quantize import QuantizedLinear, check_layout, quantize_model, rank_multiple
import clirun
from tiny import ARCHS, random_windows, tiny_model, tiny_tokenizer

# What formats 1 and 2 wrote (soco-llm before issue 24), kept here verbatim to build old folders.
OLD_QUANT_METHOD = "soco_lowrank"
OLD_LOAD_GUARD = ("soco-llm compressed model: run `import soco_llm` (pip install soco-llm) before from_pretrained, "
                  "or use soco_llm.load(folder); if soco_llm was imported, config.json lost its quantization_config "
                  "and the folder is damaged")


def as_old_format(folder, version: int) -> None:
    """Rewrite a format-3 folder as format `version` (1 or 2) was written: bare `x.A` / `x.B` factors and the
    layer's bias as `x.bias`, the soco_lowrank quantization_config, and (format 2) the old load guard."""
    cfg = json.loads((folder / "config.json").read_text())
    compressed = {n for n, r in cfg["compression"]["ranks"].items() if r > 0}
    old = {}
    for k, t in load_file(folder / FACTORED_WEIGHTS).items():
        layer, _, leaf = k.rpartition(".")
        owner, _, factor = layer.rpartition(".")
        if owner in compressed and factor in ("A", "B"):
            k = f"{owner}.{factor}" if leaf == "weight" else f"{owner}.bias"
        old[k] = t
    save_file(old, folder / "model.safetensors", metadata={"format": "pt"})  # formats 1-2's file name
    (folder / FACTORED_WEIGHTS).unlink()
    cfg["compression"]["format_version"] = version
    cfg["compression"].pop("quantization")
    cfg["quantization_config"] = {"quant_method": OLD_QUANT_METHOD, "format_version": version}
    if version == 1:
        cfg.pop("transformers_weights")
    else:
        cfg["transformers_weights"] = OLD_LOAD_GUARD
    (folder / "config.json").write_text(json.dumps(cfg))


def test_factors_are_standard_linears_and_the_function_is_unchanged():
    torch.manual_seed(0)
    A, B, bias = torch.randn(3, 16), torch.randn(8, 3), torch.randn(8)
    layer = LowRankLinear.from_factors(A, B, bias)
    assert type(layer.A) is nn.Linear and type(layer.B) is nn.Linear and layer.A.bias is None
    assert layer.bias is layer.B.bias and not hasattr(LowRankLinear, "weight")
    x = torch.randn(2, 5, 16)
    assert torch.equal(layer(x), F.linear(F.linear(x, A), B, bias))  # what the bare-parameter layer computed
    assert torch.equal(layer.to_dense().weight, B @ A)


def _compressed(arch, multiple=16):
    model = tiny_model(arch)
    # Mistral's tiny k/v layers (16 outputs) cannot take a rank of 16 at ratio 0.2: they stay dense
    exclude = ["k_proj", "v_proj"] if arch == "mistral" and multiple > 1 else None
    report = soco_llm.compress(model, soco_llm.SVDConfig(ratio=0.2, rank_multiple=multiple, exclude_modules=exclude))
    return model, report


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme, group", [("int8", None), ("int4", 32)])
def test_quantized_compressed_model_reloads_to_identical_logits(arch, scheme, group, tmp_path):
    model, report = _compressed(arch)
    names = quantize_model(model, scheme, group)
    assert names and all(isinstance(model.get_submodule(n), QuantizedLinear) for n in names)
    assert any(n.endswith(".A") for n in names) and any(n.endswith(".B") for n in names)
    x = random_windows()
    ref = model(input_ids=x).logits
    out = soco_llm.save_compressed(model, tiny_tokenizer(), tmp_path / "q", report)
    assert not any(t.is_floating_point() for k, t in load_file(out / FACTORED_WEIGHTS).items()
                   if k.endswith("qweight"))
    for loaded in (soco_llm.load(out), load_model(str(out))[0]):
        assert torch.equal(loaded(input_ids=x).logits, ref)
    assert check_folder(out)["quantization"]["scheme"] == scheme


def test_dense_model_quantized_by_the_cli_reloads_to_identical_logits(capsys, model_dir, tmp_path):
    """`soco quantize` on a dense folder: the same code as for compressed ones; eval and generate run on it."""
    out = tmp_path / "q"
    code, stdout, err = clirun.run(capsys, "quantize", model_dir, "--out", out, "--quantize", "int4",
                                   "--group-size", "32")
    assert code == 0, err
    model, _ = load_model(str(model_dir))
    quantize_model(model, "int4", 32)
    x = random_windows()
    assert torch.equal(soco_llm.load(out)(input_ids=x).logits, model(input_ids=x).logits)
    code, stdout, err = clirun.run(capsys, "generate", out, "--prompt", "The quick", "--max-new-tokens", "3")
    assert code == 0 and "3 new tokens" in stdout, err


def test_quantize_a_compressed_folder_by_the_cli(capsys, tmp_path):
    model, report = _compressed("llama")
    src = soco_llm.save_compressed(model, tiny_tokenizer(), tmp_path / "c", report)
    code, _, err = clirun.run(capsys, "quantize", src, "--out", tmp_path / "q", "--quantize", "int8")
    assert code == 0, err
    quantize_model(model, "int8")
    x = random_windows()
    assert torch.equal(soco_llm.load(tmp_path / "q")(input_ids=x).logits, model(input_ids=x).logits)
    code, _, err = clirun.run(capsys, "quantize", tmp_path / "q", "--out", tmp_path / "qq", "--quantize", "int8")
    clirun.assert_one_line_error(code, err, "quantized already")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    model, report = _compressed("llama")
    quantize_model(model, "int4", 32)
    folder = soco_llm.save_compressed(model, tiny_tokenizer(), tmp_path_factory.mktemp("q") / "q", report)
    return folder


def _damage(src, tmp_path, fn):
    import shutil
    folder = tmp_path / "d"
    shutil.copytree(src, folder)
    tensors = load_file(folder / FACTORED_WEIGHTS)
    fn(tensors)
    save_file(tensors, folder / FACTORED_WEIGHTS, metadata={"format": "pt"})
    return folder


LAYER = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("damage, match", [
    (lambda t: t.pop(f"{LAYER}.A.qweight"), "missing"),
    (lambda t: t.__setitem__(f"{LAYER}.B.qweight", t[f"{LAYER}.B.qweight"][:, :-1].contiguous()), "has shape"),
    (lambda t: t.__setitem__(f"{LAYER}.A.qweight", t[f"{LAYER}.A.qweight"].float()), "is stored as torch.float32, not torch.uint8"),
    (lambda t: t.__setitem__(f"{LAYER}.A.weight", torch.zeros(16, 64)), "has no place for"),
])
def test_damaged_quantized_folder_refuses_to_load(quantized, tmp_path, damage, match):
    folder = _damage(quantized, tmp_path, damage)
    for attempt in (lambda: soco_llm.load(folder), lambda: load_model(str(folder))):
        with pytest.raises(SocoError, match=match) as e:
            attempt()
        assert "\n" not in str(e.value)


def test_quantized_folder_with_a_bad_quantization_section_refuses(quantized, tmp_path):
    import shutil
    folder = tmp_path / "d"
    shutil.copytree(quantized, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["compression"]["quantization"]["group_size"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SocoError, match="quantization is invalid"):
        soco_llm.load(folder)


def test_truncated_quantized_folder_refuses(quantized, tmp_path):
    import shutil
    folder = tmp_path / "d"
    shutil.copytree(quantized, folder)
    w = folder / FACTORED_WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(SocoError, match="corrupt or truncated"):
        soco_llm.load(folder)


def test_rank_no_layout_accepts_fails_in_one_line_before_loading(capsys, tmp_path, monkeypatch):
    model, report = _compressed("llama", multiple=1)
    assert any(r % 16 for r in report.ranks.values() if r)
    src = soco_llm.save_compressed(model, tiny_tokenizer(), tmp_path / "c", report)
    import soco_llm.commands as commands

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the layout check")
    monkeypatch.setattr(commands, "load_model", no_loading)
    code, _, err = clirun.run(capsys, "quantize", src, "--out", tmp_path / "q", "--quantize", "int4")
    line = clirun.assert_one_line_error(code, err, "which no int4 layout takes")
    assert "rank" in line and not (tmp_path / "q").exists()
    with pytest.raises(SocoError, match="which no int4 layout takes"):
        check_layout({f"{LAYER}.A": (19, 64)}, "int4", 32, {LAYER: 19})
    check_layout({f"{LAYER}.A": (19, 64)}, "int8", None, {LAYER: 19})  # int8 takes any rank


@pytest.mark.parametrize("argv, match", [(["--quantize", "int4", "--group-size", "48"], "--group-size 48"),
                                         (["--quantize", "int3"], "invalid choice")])
def test_bad_quantize_options_fail_in_one_line(capsys, model_dir, tmp_path, argv, match):
    code, _, err = clirun.run(capsys, "quantize", model_dir, "--out", tmp_path / "q", *argv)
    assert code == 2 and match in err and not (tmp_path / "q").exists()


def test_compress_with_int4_rounds_ranks_for_the_layout(capsys, model_dir, tmp_path):
    out = tmp_path / "c"
    code, _, err = clirun.run(capsys, "compress", "--method", "svd", "--ratio", "0.2", "--model", model_dir,
                              "--out", out, "--no-eval", "--quantize", "int4", "--group-size", "32")
    assert code == 0, err
    comp = check_folder(out)
    assert comp["quantization"] == {"scheme": "int4", "group_size": 32, "layers": comp["quantization"]["layers"]}
    assert all(r % rank_multiple("int4", 32) == 0 for r in comp["ranks"].values())
    soco_llm.load(out)(input_ids=random_windows())


def test_kernels_follow_the_device():
    """The CPU runs PyTorch's packed CPU kernels; another device (meta here, standing in for CUDA, which this
    CPU build cannot simulate) takes the other branch: int8 dequantize-in-matmul, int4 CUDA packing."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 64)
    for scheme, group in (("int8", None), ("int4", 32)):
        q = QuantizedLinear.from_linear(lin, scheme, group)
        torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), lin.bias), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(q(x), lin(x), atol=0.2, rtol=0.1)
    int8 = QuantizedLinear(64, 32, "int8", device="meta")
    assert int8(torch.empty(3, 64, device="meta")).shape == (3, 32)
    int4 = QuantizedLinear(64, 32, "int4", 32, device="meta")
    assert int4._int4_packed(torch.device("meta")).device.type == "meta"


def test_bf16_quantized_model_reloads_in_bf16(tmp_path):
    model, report = _compressed("llama")
    model = model.to(torch.bfloat16)
    quantize_model(model, "int4", 32)
    x = random_windows()
    ref = model(input_ids=x).logits
    out = soco_llm.save_compressed(model, tiny_tokenizer(), tmp_path / "q", report)
    loaded = soco_llm.load(out)
    assert loaded.get_submodule(f"{LAYER}.A").scales_and_zeros.dtype == torch.bfloat16
    torch.testing.assert_close(loaded(input_ids=x).logits, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("option", ["--quantize", "--group-size", "--dtype", "--out", "MODEL"])
@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "", "{folder}", "{missing}"])
def test_quantize_options_fed_hostile_values_fail_in_one_line_and_write_nothing(capsys, model_dir, tmp_path,
                                                                                 monkeypatch, option, value):
    (tmp_path / "folder").mkdir()
    monkeypatch.chdir(tmp_path)
    value = value.replace("{folder}", str(tmp_path / "folder")).replace("{missing}", str(tmp_path / "missing"))
    args = {"MODEL": str(model_dir), "--out": str(tmp_path / "q"), "--quantize": "int4", "--group-size": "32"}
    args[option] = value
    argv = ["quantize", args.pop("MODEL"), *[x for kv in args.items() for x in kv]]
    before = clirun.files_under(tmp_path)
    code, _, err = clirun.run(capsys, *argv)
    if code != 0:
        clirun.assert_one_line_error(code, err)
        assert clirun.files_under(tmp_path) == before


def test_balanced_split_keeps_the_product_and_equalises_each_component():
    from soco_llm.core.decompose import plain_basis, whitened_basis

    torch.manual_seed(0)
    W = torch.randn(24, 32)
    X = (torch.randn(300, 32) * torch.logspace(-2, 1, 32)).double()
    d = whitened_basis(W, X.T @ X, "w")
    A0, B0 = d.factors(10, split="sqrt")
    A, B = d.factors(10)  # balanced, the default
    torch.testing.assert_close(B @ A, B0 @ A0, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(A.norm(dim=1), B.norm(dim=0), atol=1e-10, rtol=1e-10)
    assert B0.abs().max() / A0.abs().max() > 10 * B.abs().max() / A.abs().max()
    p = plain_basis(W, "p")  # unit rows and columns: the two splits agree
    for x, y in zip(p.factors(5), p.factors(5, split="sqrt")):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [15, 24, 64])
def test_int8_takes_any_input_width(dtype, width):
    """A factor B's input width is its rank, any number: padded to 16 columns (the bf16 kernel's need)."""
    torch.manual_seed(0)
    lin = nn.Linear(width, 32).to(dtype)
    q = QuantizedLinear.from_linear(lin, "int8")
    x = torch.randn(2048, width, dtype=dtype)
    torch.testing.assert_close(q(x).float(), F.linear(x, q.dequantize(), lin.bias).float(), atol=0.05, rtol=0.02)
