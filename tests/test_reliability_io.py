"""Files that load exactly or fail (issue 15): dense exports keep every bias, damaged compressed folders
are refused, plain transformers without soco_llm fails naming the fix, and folder writes are race-free
and clean up after kills."""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import soco_llm
from soco_llm import LowRankLinear, SocoError
from soco_llm.io import atomic, check_folder, clean_stale
from soco_llm.io.format import FACTORED_WEIGHTS
from soco_llm.io.atomic import atomic_dir, atomic_write_json
from soco_llm.io.format import LOAD_GUARD, read_compression
from tiny import ARCHS, random_windows, tiny_model, tiny_tokenizer

# --- 1. export-dense keeps every bias -----------------------------------------------------------------

# Where the architecture has a config switch for a bias on every linear (Llama: attention_bias and mlp_bias,
# OPT: enable_bias, GPT-2: Conv1D always has one) and where it has none for some (Qwen2: o_proj and the MLP,
# Mistral: all, Gemma3: the MLP).
EXPORTABLE = {"llama": True, "opt": True, "gpt2": True, "qwen2": False, "mistral": False, "gemma3": False}


@pytest.mark.parametrize("arch", ARCHS)
def test_export_dense_keeps_soco_biases(arch, tmp_path):
    model = tiny_model(arch)
    dense_has_bias = {n for n, m in model.named_modules() if getattr(m, "bias", None) is not None}
    report = soco_llm.compress(model, soco_llm.SoCoConfig(ratio=0.4, steps=2, batch_size=4), random_windows(8, 32), heal_config=soco_llm.HealConfig())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # d after 2 steps is small; make every bias matter for the logits
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.bias.add_(0.05 * torch.randn(m.bias.shape, generator=g))
    added = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear) and n not in dense_has_bias]
    assert added or arch in ("opt", "gpt2")  # SoCo put biases where the dense architecture had none
    x = random_windows()
    ref = model(input_ids=x).logits
    folder = soco_llm.save_compressed(model, tiny_tokenizer(), tmp_path / "c", report)

    if not EXPORTABLE[arch]:
        with pytest.raises(SocoError, match=rf"{type(model).__name__}.*no config switch .* model\.layers\.0\."):
            soco_llm.export_dense(folder, tmp_path / "dense")
        assert not (tmp_path / "dense").exists()
        return
    out = soco_llm.export_dense(folder, tmp_path / "dense")
    dense, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(dense(input_ids=x).logits, ref, atol=1e-4, rtol=1e-4)
    cfg = json.loads((out / "config.json").read_text())
    if arch == "llama":
        assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    assert not {"compression", "quantization_config", "transformers_weights"} & set(cfg)


def test_bias_switch_zero_fills_the_rest_of_its_group(tmp_path):
    """One biased q_proj turns Llama's attention_bias on; the other attention layers get exact zero biases."""
    model = tiny_model("llama")
    soco_llm.compress(model, soco_llm.SVDConfig(ratio=0.4))
    layer = model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, LowRankLinear) and layer.bias is None
    layer.bias = torch.nn.Parameter(torch.randn(layer.out_features))
    x = random_windows()
    ref = model(input_ids=x).logits
    out = soco_llm.save_dense(model, None, tmp_path / "dense")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is False
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=x).logits, ref, atol=1e-4,
                               rtol=1e-4)


def test_zero_bias_without_switch_is_dropped_exactly(tmp_path):
    """Mistral has no bias switch, but a bias of zeros loses nothing, so the export goes ahead."""
    model = tiny_model("mistral")
    soco_llm.compress(model, soco_llm.SVDConfig(ratio=0.4))
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            m.bias = torch.nn.Parameter(torch.zeros(m.out_features))
    x = random_windows()
    ref = model(input_ids=x).logits
    out = soco_llm.save_dense(model, None, tmp_path / "dense")
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=x).logits, ref, atol=1e-4,
                               rtol=1e-4)


def test_dense_folder_with_a_tensor_transformers_would_drop_is_not_written(tmp_path):
    model = tiny_model("llama")
    model.model.layers[0].register_parameter("stray", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(SocoError, match="no place for .*model.layers.0.stray"):
        soco_llm.save_dense(model, None, tmp_path / "dense")
    assert not (tmp_path / "dense").exists() and not list(tmp_path.iterdir())


# --- 2. a compressed folder loads exactly or fails ---------------------------------------------------------

@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    model = tiny_model("llama")
    report = soco_llm.compress(model, soco_llm.SVDLLMConfig(ratio=0.4), random_windows())
    folder = soco_llm.save_compressed(model, tiny_tokenizer(), tmp_path_factory.mktemp("c") / "c", report)
    return folder, model(input_ids=random_windows()).logits


@pytest.fixture
def folder(compressed, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(compressed[0], out)
    return out


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    tensors = load_file(folder / FACTORED_WEIGHTS)
    fn(tensors)
    save_file(tensors, folder / FACTORED_WEIGHTS, metadata={"format": "pt"})


def _refused(folder, match):
    """Every soco-llm way in refuses the folder with one SocoError line; plain from_pretrained never loads it."""
    for attempt in (lambda: soco_llm.load(folder), lambda: soco_llm.load_model(str(folder))):
        with pytest.raises(SocoError, match=match) as e:
            attempt()
        assert "\n" not in str(e.value)
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(folder)


LAYER = "model.layers.0.self_attn.q_proj"


def test_good_folder_passes_check_folder(compressed):
    comp = check_folder(compressed[0])
    assert comp["ranks"][LAYER] > 0 and comp["format_version"] == 3
    loaded = soco_llm.load(compressed[0])
    assert torch.equal(loaded(input_ids=random_windows()).logits, compressed[1])


@pytest.mark.parametrize("rank", [-3, 2.5, "8", True, None])
def test_invalid_rank_is_refused(folder, rank):
    _edit_config(folder, lambda c: c["compression"]["ranks"].__setitem__(LAYER, rank))
    _refused(folder, rf"rank of {LAYER} is .*not an integer")
    with pytest.raises(SocoError, match="not an integer"):
        check_folder(folder)


@pytest.mark.parametrize("delta", [-1, 1])
def test_rank_that_does_not_match_the_factors_is_refused(folder, delta):
    _edit_config(folder, lambda c: c["compression"]["ranks"].__setitem__(LAYER, c["compression"]["ranks"][LAYER] + delta))
    _refused(folder, "shape")
    with pytest.raises(SocoError, match=rf"{LAYER}\.A\.weight has shape"):
        check_folder(folder)


def test_rank_zero_for_a_compressed_layer_is_refused(folder):
    """0 means 'left dense', so the dense weight is missing and the factors have no place: never random."""
    _edit_config(folder, lambda c: c["compression"]["ranks"].__setitem__(LAYER, 0))
    _refused(folder, "missing")
    with pytest.raises(SocoError, match=rf"missing from the weights \(first: {LAYER}\.weight\)"):
        check_folder(folder)


@pytest.mark.parametrize("version, match", [(99, "format version 99; upgrade soco-llm"), (0, "invalid format_version"),
                                            ("2", "invalid format_version"), (None, "invalid format_version")])
def test_unknown_format_version_is_refused_on_every_path(folder, version, match):
    _edit_config(folder, lambda c: c["compression"].__setitem__("format_version", version))
    _refused(folder, match)
    with pytest.raises(SocoError, match=match):
        read_compression(folder)


def test_format_3_leaves_quantization_config_free_and_guards_from_pretrained(folder):
    """transformers' one quantization_config slot is free (torchao and others use it); plain from_pretrained,
    soco_llm imported or not, hits the load guard, which names the fix."""
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match=r"soco_llm\.load\(folder\)"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_missing_factor_is_refused(folder):
    _edit_weights(folder, lambda t: t.pop(f"{LAYER}.B.weight"))
    _refused(folder, "missing")


@pytest.mark.parametrize("key, shape", [("model.layers.0.extra.weight", (3,)), (f"{LAYER}.weight", (64, 64))])
def test_unexpected_tensor_is_refused(folder, key, shape):
    _edit_weights(folder, lambda t: t.__setitem__(key, torch.zeros(shape)))
    _refused(folder, "has no place for|does not list")


def test_factor_of_the_wrong_width_is_refused(folder):
    """A's input width is not in config.json: the check against the model rebuilt on meta sees it."""
    _edit_weights(folder, lambda t: t.__setitem__(f"{LAYER}.A.weight",
                                                  torch.zeros(t[f"{LAYER}.A.weight"].shape[0], 65)))
    for attempt in (lambda: check_folder(folder), lambda: soco_llm.load(folder)):
        with pytest.raises(SocoError, match=rf"{LAYER}\.A\.weight has shape \[\d+, 65\]"):
            attempt()


@pytest.mark.parametrize("name", ["../../etc/passwd", "model.__class__", "model..layers", ""])
def test_hostile_layer_name_is_refused(folder, name):
    _edit_config(folder, lambda c: c["compression"]["ranks"].__setitem__(name, 4))
    _refused(folder, "not a module name")


def test_truncated_weights_fail_check_folder(folder):
    weights = folder / FACTORED_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SocoError, match="corrupt or truncated"):
        check_folder(folder)


@pytest.mark.parametrize("version", [1, 2])
def test_folder_of_format_1_or_2_still_loads(compressed, folder, version):
    """Formats 1 and 2 as the old code wrote them (bare `x.A` / `x.B` factors, the soco_lowrank
    quantization_config; format 1 without the load guard) load exactly with soco_llm.load, and
    from_pretrained names the fix."""
    from test_format3 import as_old_format
    as_old_format(folder, version)
    x = random_windows()
    assert torch.equal(soco_llm.load(folder)(input_ids=x).logits, compressed[1])
    assert check_folder(folder)["format_version"] == version
    with pytest.raises(SocoError, match=r"format .*soco_llm\.load\(folder\)"):
        AutoModelForCausalLM.from_pretrained(folder)


# --- 3. plain transformers without soco_llm fails, naming the fix ------------------------------------------

def test_plain_transformers_without_soco_llm_fails_naming_the_fix(compressed):
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(compressed[0])!r})\n"
            "assert 'soco_llm' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    assert "soco_llm.load(folder)" in r.stderr and LOAD_GUARD in r.stderr


# --- 4. race-free folder writes, stale leftovers -----------------------------------------------------------

@pytest.fixture(params=["native", "fallback"])
def rename_mode(request, monkeypatch):
    """Every atomic_dir test runs with the platform's flagged renames and with the portable fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(atomic, "_NATIVE", None)
    return request.param


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_writer_that_finds_the_folder_taken_at_the_end_fails_and_replaces_nothing(tmp_path, rename_mode):
    out = tmp_path / "out"
    with pytest.raises(SocoError, match="appeared while this one was being written"), atomic_dir(out) as tmp:
        (tmp / "mine.txt").write_text("second")
        out.mkdir()  # the other writer finished first
        (out / "theirs.txt").write_text("first")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert not _leftovers(tmp_path)


def test_fallback_reservation_filled_meanwhile_is_kept(tmp_path, monkeypatch):
    """Without flagged renames the path is reserved by mkdir; whatever lands in the reservation before the
    rename stays, and the writer is refused."""
    monkeypatch.setattr(atomic, "_NATIVE", None)
    out, real = tmp_path / "out", os.mkdir

    def mkdir_then_someone_writes(path, *a):
        real(path, *a)
        if path == out:
            (out / "theirs.txt").write_text("first")

    with pytest.raises(SocoError, match="appeared"), atomic_dir(out) as tmp:
        (tmp / "mine.txt").write_text("second")
        monkeypatch.setattr(atomic.os, "mkdir", mkdir_then_someone_writes)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and not _leftovers(tmp_path)


def test_two_concurrent_writers_exactly_one_wins(tmp_path, rename_mode):
    out, barrier, results = tmp_path / "out", threading.Barrier(2), {}

    def write(name):
        try:
            with atomic_dir(out) as tmp:
                (tmp / "who").write_text(name)
                barrier.wait(timeout=30)  # both blocks are done; both renames race
            results[name] = "ok"
        except SocoError:
            results[name] = "refused"

    threads = [threading.Thread(target=write, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["ok", "refused"]
    winner = next(n for n, r in results.items() if r == "ok")
    assert (out / "who").read_text() == winner and not _leftovers(tmp_path)


def test_overwrite_leaves_the_new_folder(tmp_path, rename_mode):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not _leftovers(tmp_path)


def _content(out):
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked writer")
@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_kill_during_overwrite_leaves_old_or_new(tmp_path, rename_mode, monkeypatch, kill_at):
    """A forked writer is killed (os._exit, no cleanup) at its n-th rename or removal; the output path then
    holds the old or the new folder (with the fallback, once clean_stale has put the old one back)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    steps = []

    def step(real):
        def wrapped(*a, **kw):
            steps.append(real.__name__)
            if len(steps) == kill_at:
                os._exit(0)
            return real(*a, **kw)
        return wrapped

    pid = os.fork()
    if pid == 0:  # the writer
        try:
            monkeypatch.setattr(atomic.os, "rename", step(os.rename))
            monkeypatch.setattr(atomic, "_rename_flagged", step(atomic._rename_flagged))
            monkeypatch.setattr(atomic, "_remove", step(atomic._remove))
            with atomic_dir(out, overwrite=True) as tmp:
                (tmp / "new.txt").write_text("new")
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    if rename_mode == "native":
        assert _content(out) in (["old.txt"], ["new.txt"])  # at every moment, without any cleaning
    clean_stale(out)
    assert _content(out) in (["old.txt"], ["new.txt"])
    assert not _leftovers(tmp_path)


def test_fallback_interrupted_between_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_NATIVE", None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # out -> aside went through; new -> out fails
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _content(out) == ["old.txt"] and not _leftovers(tmp_path)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_clean_stale_removes_dead_writers_leftovers_only(tmp_path):
    me, start = os.getpid(), atomic._start_time(os.getpid())
    dead = _dead_pid()
    stale_dir = tmp_path / f".out.soco-tmp-{dead}-{start}-ab12"
    stale_file = tmp_path / f".config.json.soco-tmp-{dead}-{start}-cd34"
    reused = tmp_path / f".out.soco-tmp-{me}-{start - 1000}-ef56"  # our PID, another start: a reused PID
    live = tmp_path / f".out.soco-tmp-{me}-{start}-0a0b"
    orphan_old = tmp_path / f".gone.soco-old-{dead}-{start}-1234"  # a replace killed between its renames
    obsolete_old = tmp_path / f".out.soco-old-{dead}-{start}-5678"  # ... after the new one was in place
    unrelated = tmp_path / ".out.tmp-123"
    for d in (stale_dir, reused, live, orphan_old, obsolete_old, unrelated, tmp_path / "out"):
        d.mkdir()
    (orphan_old / "old.txt").write_text("old")
    stale_file.write_text("{")

    expected = sorted([stale_dir, stale_file, reused, orphan_old, obsolete_old])
    assert sorted(clean_stale(tmp_path, dry_run=True)) == expected
    assert all(p.exists() for p in expected)
    assert sorted(clean_stale(tmp_path)) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unrelated.name, "gone", "out"])
    assert (tmp_path / "gone" / "old.txt").read_text() == "old"


def test_clean_stale_given_a_missing_output_path_restores_it(tmp_path):
    dead, start = _dead_pid(), atomic._start_time(os.getpid())
    (tmp_path / f".out.soco-old-{dead}-{start}-1234").mkdir()
    (tmp_path / f".other.soco-tmp-{dead}-{start}-1234").mkdir()
    assert [p.name for p in clean_stale(tmp_path / "out")] == [f".out.soco-old-{dead}-{start}-1234"]
    assert (tmp_path / "out").is_dir() and (tmp_path / f".other.soco-tmp-{dead}-{start}-1234").exists()


def test_atomic_dir_cleans_stale_siblings_first(tmp_path):
    dead, start = _dead_pid(), atomic._start_time(os.getpid())
    stale = tmp_path / f".out.soco-tmp-{dead}-{start}-ab12"
    stale.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not stale.exists() and (tmp_path / "out" / "x").is_file()


def test_failed_writes_leave_nothing(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out"):
        raise RuntimeError("boom")
    monkeypatch.setattr(atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write_json(tmp_path / "f.json", {"a": 1})
    assert not list(tmp_path.iterdir())
