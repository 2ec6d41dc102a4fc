"""Issue 23's cases: every input is exact or refused, every file read may be damaged, every write may fail,
--overwrite never touches an input, a target that cannot be met is refused before the work, and help and
behaviour agree. Each failure is one line and exit code 2, with nothing written."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import soco_llm
from clirun import assert_one_line_error, files_under, run
from tiny import tiny_model, tiny_tokenizer


def _svd_llm(model, text_file, out, *extra):
    return ["compress", "--method", "svd-llm", "--ratio", "0.4", "--model", model, "--out", out, "--calib", text_file,
            "--samples", "4", "--seq-len", "16", "--no-eval", *extra]


def _soco(model, text_file, out, *extra):
    return ["compress", "--method", "soco", "--ratio", "0.4", "--model", model, "--out", out, "--calib", text_file,
            "--samples", "8", "--seq-len", "16", "--batch-size", "4", "--no-eval", *extra]


def _without_tensor(src: Path, dst: Path, part: str) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors[next(k for k in tensors if part in k)]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# 1. A damaged dense input is refused, never loaded with random weights.

def test_dense_folder_missing_a_tensor_is_refused_everywhere(capsys, model_dir, text_file, tmp_path):
    broken = _without_tensor(model_dir, tmp_path / "broken", "q_proj")
    code, _, err = run(capsys, *_svd_llm(broken, text_file, tmp_path / "out"))
    assert_one_line_error(code, err, "missing from its weights (first: model.layers.0.self_attn.q_proj.weight)")
    assert not (tmp_path / "out").exists()
    code, _, err = run(capsys, "eval", broken, "--eval-data", text_file, "--eval-seq-len", "16", "--eval-windows", "1")
    assert_one_line_error(code, err, "random weights")
    with pytest.raises(soco_llm.SocoError, match="does not load exactly"):
        soco_llm.load_model(str(broken))


def test_config_of_another_architecture_is_refused(capsys, model_dir, text_file, tmp_path):
    other = tmp_path / "bert-config"
    shutil.copytree(model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertLMHeadModel"]}))
    code, _, err = run(capsys, *_svd_llm(other, text_file, tmp_path / "out"))
    assert_one_line_error(code, err, "config.json names another architecture than its weights")
    assert not (tmp_path / "out").exists()


def test_a_tensor_of_another_shape_is_refused(model_dir, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(model_dir, odd)
    tensors = load_file(str(model_dir / "model.safetensors"))
    key = next(k for k in tensors if "down_proj" in k)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(odd / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(soco_llm.SocoError, match="does not load exactly"):
        soco_llm.load_model(str(odd))


# 2. from_pretrained after `import soco_llm` never loads a compressed folder with random layers, even one
# whose config.json lost its load guard (and its format-2 quantization_config).

def test_from_pretrained_of_a_compressed_folder_without_its_guard_fails(capsys, model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "c"
    code, _, err = run(capsys, *_svd_llm(model_dir, text_file, out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    config.pop("transformers_weights")
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception) as raised:  # transformers finds no weights file of its own: an error
        AutoModelForCausalLM.from_pretrained(str(out))
    assert not isinstance(raised.value, AssertionError)


# 3. --overwrite never touches an input.

@pytest.mark.parametrize("which", ["--calib", "--eval-data"])
def test_overwrite_never_deletes_an_input_inside_the_output(capsys, model_dir, text_file, tmp_path, which):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a model folder, which --overwrite may replace
    mine = out / "my_calib.txt"
    mine.write_text(text_file.read_text())
    argv = _svd_llm(model_dir, text_file, out, "--overwrite")
    if which == "--calib":
        argv[argv.index("--calib") + 1] = mine
    else:
        argv.remove("--no-eval")
        argv += ["--eval-data", mine, "--eval-seq-len", "16", "--eval-windows", "1"]
    before = files_under(out)
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "an input of this command")
    assert mine.is_file() and files_under(out) == before


# 4. Damaged files the tool reads are one line.

@pytest.fixture(scope="module")
def soco_run(tmp_path_factory):
    """A finished tiny SoCo run folder (basis, teacher, scores, checkpoint)."""
    from soco_llm.cli import main
    from tiny import SAMPLE_TEXT

    root = tmp_path_factory.mktemp("soco-run")
    soco_llm.save_dense(tiny_model("llama"), tiny_tokenizer(), root / "model")
    (root / "text.txt").write_text(SAMPLE_TEXT * 4)
    assert main([str(a) for a in _soco(root / "model", root / "text.txt", root / "out", "--set", "steps=2",
                                       "whiten_samples=4", "checkpoint_every=1", "--heal-steps", "0")]) == 0
    return root


def _damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a pickle under a safetensors name: never unpickled, refused
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))


@pytest.mark.parametrize("how", ["truncated", "empty", "pickle"])
@pytest.mark.parametrize("name", ["basis.safetensors", "soco_scores.safetensors", "teacher.safetensors"])
def test_damaged_run_files_in_export_are_one_line(capsys, soco_run, tmp_path, name, how):
    run_dir = tmp_path / "out.run"
    shutil.copytree(soco_run / "out.run", run_dir)
    _damage(run_dir / name, how)
    heal = ["--heal-steps", "1"] if name == "teacher.safetensors" else []
    code, _, err = run(capsys, "export", "--from", run_dir, "--ratio", "0.5", "--out", tmp_path / "e", "--no-eval",
                       *heal)
    assert_one_line_error(code, err, name)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("name", ["basis.safetensors", "checkpoint.safetensors"])
def test_damaged_run_files_in_resume_are_one_line(capsys, soco_run, tmp_path, name):
    run_dir = tmp_path / "out.run"
    shutil.copytree(soco_run / "out.run", run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**meta, "status": "running"}))  # resumed, not re-saved
    _damage(run_dir / name, "truncated")
    code, _, err = run(capsys, *_soco(soco_run / "model", soco_run / "text.txt", tmp_path / "o", "--resume",
                                      "--run-dir", run_dir, "--set", "steps=2", "whiten_samples=4",
                                      "checkpoint_every=1", "--heal-steps", "0"))
    assert_one_line_error(code, err, name)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,needle", [(b"", "is empty"), (b"just some text, not a model", "not a GGUF file"),
                                            (b"GGUF\x03\x00\x00\x00\x05", "truncated or damaged")])
@pytest.mark.parametrize("command", ["compress", "eval", "generate"])
def test_damaged_gguf_is_one_line(capsys, text_file, tmp_path, content, needle, command):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    argv = {"compress": _svd_llm(gguf, text_file, tmp_path / "out"),
            "eval": ["eval", gguf, "--eval-data", text_file, "--eval-seq-len", "16", "--eval-windows", "1"],
            "generate": ["generate", gguf, "--max-new-tokens", "2"]}[command]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_damaged_tokenizer_file_is_one_line(capsys, model_dir, text_file, tmp_path):
    broken = tmp_path / "broken-tok"
    shutil.copytree(model_dir, broken)
    (broken / "tokenizer.json").write_text("{ not json")
    code, _, err = run(capsys, "eval", broken, "--eval-data", text_file, "--eval-seq-len", "16", "--eval-windows", "1")
    assert_one_line_error(code, err, "could not load model")


# 4. Windows longer than a model's learned positions.

@pytest.fixture
def gpt2_dir(tmp_path):
    out = tmp_path / "gpt2"
    soco_llm.save_dense(tiny_model("gpt2"), tiny_tokenizer(), out)  # 256 learned positions
    return out


def test_default_eval_window_fits_a_model_with_fewer_positions(capsys, gpt2_dir, text_file):
    code, out, err = run(capsys, "eval", gpt2_dir, "--eval-data", text_file, "--eval-windows", "1")
    assert code == 0, err
    assert "windows of 256" in out


@pytest.mark.parametrize("argv_tail,option", [(["--eval-seq-len", "512"], "--eval-seq-len"),
                                              (["--seq-len", "512"], "--seq-len")])
def test_a_window_longer_than_the_positions_is_refused(capsys, gpt2_dir, text_file, tmp_path, argv_tail, option):
    argv = _svd_llm(gpt2_dir, text_file, tmp_path / "out")
    argv.remove("--no-eval")
    argv = [*argv, "--eval-data", text_file, "--eval-windows", "1", "--eval-seq-len", "16", *argv_tail]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, f"{option} 512 is longer than the 256 positions")
    assert not (tmp_path / "out").exists()


def test_baseline_calibration_fits_a_model_with_fewer_positions(capsys, gpt2_dir, text_file, tmp_path):
    argv = _svd_llm(gpt2_dir, text_file, tmp_path / "out", "--baseline", "svd-llm")
    argv.remove("--no-eval")
    code, out, err = run(capsys, *argv, "--eval-data", text_file, "--eval-windows", "1", "--eval-seq-len", "16")
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").is_file()


# 4. Writes that fail: checked up front where they can be, one line and nothing half-written where not.

def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing(capsys, monkeypatch, model_dir, text_file, tmp_path):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(soco_llm.io.save_load, "save_file", full)
    code, _, err = run(capsys, *_svd_llm(model_dir, text_file, tmp_path / "out"))
    assert_one_line_error(code, err, "No space left on device")
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def test_safetensors_own_disk_full_error_is_one_line(capsys, monkeypatch, model_dir, text_file, tmp_path):
    def full(*a, **k):  # safetensors wraps the OS error in its own type, as text
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                           "\"No space left on device\" })")

    monkeypatch.setattr(soco_llm.io.save_load, "save_file", full)
    code, _, err = run(capsys, *_svd_llm(model_dir, text_file, tmp_path / "out"))
    assert_one_line_error(code, err, "No space left")
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def test_a_read_only_output_folder_is_refused_before_the_model_loads(capsys, monkeypatch, model_dir, text_file,
                                                                       tmp_path):
    import soco_llm.commands

    real = tempfile.NamedTemporaryFile
    parent = tmp_path / "readonly"
    parent.mkdir()

    def read_only(*a, dir=None, **k):  # what a read-only mount answers, which root's permissions cannot show
        if Path(dir) == parent:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    monkeypatch.setattr(soco_llm.commands, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    code, _, err = run(capsys, *_svd_llm(model_dir, text_file, parent / "out"))
    assert_one_line_error(code, err, "Read-only file system")
    assert not list(parent.iterdir())


def test_too_little_free_space_is_refused_before_the_work(capsys, monkeypatch, model_dir, text_file, tmp_path):
    from collections import namedtuple

    import soco_llm.commands

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    monkeypatch.setattr(soco_llm.commands, "compress", lambda *a, **k: pytest.fail("compressed before the check"))
    code, _, err = run(capsys, *_svd_llm(model_dir, text_file, tmp_path / "out"))
    assert_one_line_error(code, err, "GiB free")
    assert not (tmp_path / "out").exists()


def test_cache_that_is_a_file_is_one_line(capsys, monkeypatch, text_file, tmp_path):
    monkeypatch.setenv("SOCO_LLM_CACHE", str(text_file))
    code, _, err = run(capsys, "eval", "--eval-data", text_file, "--eval-seq-len", "16", "--eval-windows", "1")
    assert_one_line_error(code, err, "SOCO_LLM_CACHE")


# 5. Refusals that come before the work and say the right thing.

def test_a_dangling_link_as_out_is_refused_before_loading(capsys, monkeypatch, model_dir, text_file, tmp_path):
    import soco_llm.commands

    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere" / "x")
    monkeypatch.setattr(soco_llm.commands, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    code, _, err = run(capsys, *_svd_llm(model_dir, text_file, link))
    line = assert_one_line_error(code, err, "symbolic link")
    assert "overwrite=True" not in line


@pytest.mark.parametrize("method", ["svd-llm", "svd", "soco"])
def test_a_ratio_that_cannot_be_met_is_refused_before_the_work(capsys, monkeypatch, model_dir, text_file, tmp_path,
                                                                 method):
    import soco_llm.commands

    monkeypatch.setattr(soco_llm.commands, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    argv = _svd_llm(model_dir, text_file, tmp_path / "out")
    argv[argv.index("--method") + 1] = method
    argv[argv.index("--ratio") + 1] = "0.999"
    argv.remove("--no-eval")
    code, _, err = run(capsys, *argv, "--eval-data", text_file, "--eval-seq-len", "16", "--eval-windows", "1")
    assert_one_line_error(code, err, "ratio 0.999 is out of reach")
    assert not (tmp_path / "out").exists()


def test_export_refuses_the_same_ratio_in_the_same_words(capsys, soco_run, tmp_path):
    code, _, err = run(capsys, "export", "--from", soco_run / "out.run", "--ratio", "0.999", "--out", tmp_path / "e",
                       "--no-eval")
    assert_one_line_error(code, err, "ratio 0.999 is out of reach")


def test_quick_with_a_changed_value_still_does_not_heal(capsys, model_dir, text_file, tmp_path):
    code, _, err = run(capsys, *_soco(model_dir, text_file, tmp_path / "out", "--quick", "--set", "steps=3",
                                      "whiten_samples=4"))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    assert "heal" not in report["config"] and not (tmp_path / "out.heal").exists()
    assert report["config"]["preset"] == "quick" and report["config"]["steps"] == 3
