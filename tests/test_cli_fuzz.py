"""Every option of every subcommand fed hostile values: each run ends in success or in exit code 2 with one
line on stderr and no traceback, and a failure writes nothing.

Runs are in-process on a tiny model. Cheap methods run for real (svd-llm on 4 windows of 16 tokens, without
evaluation unless an eval option is the one under test); SoCo settings stop where the model would be
loaded, because a value that passes validation would start training.
"""

from __future__ import annotations

import dataclasses

import pytest

import soco_llm
from clirun import assert_one_line_error, files_under, run
from soco_llm.io import atomic

HOSTILE = ["0", "-1", "1.5", "abc", "nan", "inf", "", "{binary}", "{missing}", "{folder}"]
# JSON-ish values for --set KEY=VALUE, besides HOSTILE (read as JSON, else as a bare string).
HOSTILE_JSON = ["NaN", "-Infinity", "true", "null", "[]", "[1, -2]", '"x"', "{}"]


class _WouldLoad(Exception):
    """Raised where a SoCo run would load its model: its settings passed validation."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, text, a compressed folder, a finished SoCo run, and the hostile files, made once."""
    from soco_llm.cli import main
    from tiny import SAMPLE_TEXT, tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("fuzz")
    soco_llm.save_dense(tiny_model("llama"), tiny_tokenizer(), root / "model")
    (root / "text.txt").write_text(SAMPLE_TEXT * 4)
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "folder").mkdir()
    common = ["--model", str(root / "model"), "--calib", str(root / "text.txt"), "--samples", "8", "--seq-len", "16",
              "--no-eval"]
    assert main(["compress", "--method", "svd", "--ratio", "0.4", "--out", str(root / "compressed"), *common]) == 0
    assert main(["compress", "--method", "soco", "--ratio", "0.4", "--out", str(root / "soco"), *common,
                 "--batch-size", "4", "--set", "steps=2", "whiten_samples=4"]) == 0
    return root


def _check(capsys, monkeypatch, tmp_path, world, argv, case: str) -> None:
    """Run `argv` in a fresh folder: success, or exit 2 with one line and nothing written anywhere.
    "{binary}", "{folder}" and "{missing}" in argv's items become those paths ("{missing}" is missing in every case:
    a run that succeeds may create it)."""
    work = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    monkeypatch.chdir(work)  # hostile values that are valid paths ("0", "abc") land here
    paths = {"{binary}": world / "binary.bin", "{folder}": world / "folder", "{missing}": work / "missing"}
    for key, path in paths.items():
        argv = [str(a).replace(key, str(path)) for a in argv]
    case = f"{case}: soco {' '.join(argv)}"
    before = files_under(world), files_under(work)
    try:
        code, _, err = run(capsys, *argv)
    except _WouldLoad:
        capsys.readouterr()
        return
    if code == 0:
        return
    try:
        assert_one_line_error(code, err)
    except AssertionError as e:
        raise AssertionError(f"{case}: {e}") from None
    assert (files_under(world), files_under(work)) == before, f"{case} failed but wrote files"


def _compress_base(world, out="out"):
    return ["compress", "--method", "svd-llm", "--ratio", "0.4", "--model", world / "model", "--out", out,
            "--calib", world / "text.txt", "--samples", "4", "--seq-len", "16", "--eval-data", world / "text.txt",
            "--eval-seq-len", "16", "--eval-windows", "1", "--no-eval"]


COMPRESS_OPTIONS = ["--method", "--ratio", "--model", "--out", "--calib", "--samples", "--seq-len", "--seed",
                    "--batch-size", "--alpha", "--target-modules", "--exclude-modules", "--set", "--preset",
                    "--run-dir",
                    "--dtype", "--device", "--baseline", "--eval-data", "--eval-windows", "--eval-seq-len",
                    "--eval-batch-size"]
EVAL_OPTIONS = ["--eval-data", "--eval-windows", "--eval-seq-len", "--eval-batch-size"]


@pytest.mark.parametrize("option", COMPRESS_OPTIONS)
def test_compress_option(capsys, monkeypatch, tmp_path, world, option):
    for value in HOSTILE:
        argv = [*_compress_base(world), option, value]
        if option in EVAL_OPTIONS or option == "--baseline":  # evaluated only with evaluation on
            argv.remove("--no-eval")
        _check(capsys, monkeypatch, tmp_path, world, argv, f"compress {option} {value!r}")


@pytest.mark.parametrize("flags", [["--overwrite"], ["--sequential"], ["--quick"], ["--resume"],
                                   ["--method", "soco", "--resume", "--run-dir", ""]])
def test_compress_flags(capsys, monkeypatch, tmp_path, world, flags):
    import soco_llm.commands

    monkeypatch.setattr(soco_llm.commands, "load_model", _would_load)
    _check(capsys, monkeypatch, tmp_path, world, [*_compress_base(world), *flags], f"compress {flags}")


def _would_load(*a, **k):
    raise _WouldLoad


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(soco_llm.SoCoConfig)])
def test_soco_setting(capsys, monkeypatch, tmp_path, world, field):
    import soco_llm.commands

    monkeypatch.setattr(soco_llm.commands, "load_model", _would_load)
    base = [*_compress_base(world), "--method", "soco", "--set", "steps=2"]
    for value in HOSTILE + HOSTILE_JSON:
        _check(capsys, monkeypatch, tmp_path, world, [*base, f"{field}={value}"], f"--set {field}={value!r}")


@pytest.mark.parametrize("option", ["model", *EVAL_OPTIONS, "--dtype", "--device", "--tasks", "--limit",
                                    "--num-fewshot"])
def test_eval_option(capsys, monkeypatch, tmp_path, world, option):
    base = ["eval", world / "compressed", "--eval-data", world / "text.txt", "--eval-seq-len", "16",
            "--eval-windows", "1"]
    # Task names other than soco_* make lm-eval index its thousands of tasks (seconds each): a few suffice here.
    values = ["", ",", "soco_nope", "soco_piqa,soco_nope"] if option == "--tasks" else HOSTILE
    for value in values:
        argv = ["eval", value, *base[2:]] if option == "model" else [*base, option, value]
        _check(capsys, monkeypatch, tmp_path, world, argv, f"eval {option} {value!r}")


@pytest.mark.parametrize("option", ["folder", "--json"])
def test_info_option(capsys, monkeypatch, tmp_path, world, option):
    for value in HOSTILE:
        argv = ["info", value] + (["--json"] if option == "--json" else [])
        _check(capsys, monkeypatch, tmp_path, world, argv, f"info {value!r}")


@pytest.mark.parametrize("option", ["--from", "--ratio", "--out", "--device", *EVAL_OPTIONS])
def test_export_option(capsys, monkeypatch, tmp_path, world, option):
    base = ["export", "--from", world / "soco.run", "--ratio", "0.5", "--out", "out", "--eval-data",
            world / "text.txt", "--eval-seq-len", "16", "--eval-windows", "1"]
    for value in HOSTILE:
        argv = [*base, option, value] + ([] if option in EVAL_OPTIONS else ["--no-eval"])
        _check(capsys, monkeypatch, tmp_path, world, argv, f"export {option} {value!r}")


@pytest.mark.parametrize("option", ["folder", "--out"])
def test_export_dense_option(capsys, monkeypatch, tmp_path, world, option):
    for value in HOSTILE:
        argv = (["export-dense", value, "--out", "out"] if option == "folder"
                else ["export-dense", world / "compressed", "--out", value])
        _check(capsys, monkeypatch, tmp_path, world, argv, f"export-dense {option} {value!r}")


@pytest.mark.skipif(not hasattr(atomic, "clean_stale"), reason="soco_llm.io.atomic.clean_stale is not there yet")
@pytest.mark.parametrize("flags", [[], ["--dry-run"]])
def test_clean_path(capsys, monkeypatch, tmp_path, world, flags):
    for value in HOSTILE:
        _check(capsys, monkeypatch, tmp_path, world, ["clean", value, *flags], f"clean {value!r} {flags}")


# Every file a command reads may be damaged: in a copy of its folder each file is cut short (a safetensors file)
# or replaced by other bytes (the rest), and every command that reads that folder ends in success or in one line,
# writing nothing. (`generate` and `export-dense` load through the same code as `eval`.)
READERS = {  # folder -> commands that read it ("{dir}" is the damaged copy)
    "model": [["eval", "{dir}", "--eval-seq-len", "16", "--eval-windows", "1", "--eval-data", "{text}"],
              ["compress", "--method", "svd", "--ratio", "0.4", "--model", "{dir}", "--out", "out", "--no-eval",
               "--calib", "{text}", "--samples", "4", "--seq-len", "16"]],
    "compressed": [["eval", "{dir}", "--eval-seq-len", "16", "--eval-windows", "1", "--eval-data", "{text}"],
                   ["info", "{dir}"]],
    "soco.run": [["export", "--from", "{dir}", "--ratio", "0.5", "--out", "out", "--no-eval", "--heal-steps", "1"]],
}


def _damaged(data: bytes, name: str) -> bytes:
    return data[: len(data) // 2] if name.endswith(".safetensors") else b"\x80not it" * 9


@pytest.mark.parametrize("folder", sorted(READERS))
def test_damaged_file(capsys, monkeypatch, tmp_path, world, folder):
    import shutil

    names = sorted(p.name for p in (world / folder).iterdir() if p.is_file())
    assert names, folder
    for name in names:
        copy = tmp_path / f"{folder}-{name}"
        shutil.copytree(world / folder, copy)
        (copy / name).write_bytes(_damaged((copy / name).read_bytes(), name))
        for argv in READERS[folder]:
            argv = [{"{dir}": str(copy), "{text}": str(world / "text.txt")}.get(a, a) for a in argv]
            _check(capsys, monkeypatch, tmp_path, world, argv, f"damaged {folder}/{name}")
