"""Issue 15's CLI cases: bad input is one line and exit code 2 before any work, with nothing written;
interrupted runs leave a state the next command understands; messages say what is true."""

import json

import pytest
import torch

import soco_llm
from clirun import assert_one_line_error, run
from soco_llm import SocoError, save_dense
from soco_llm.cli import build_parser
from soco_llm.io.format import FACTORED_WEIGHTS
from tiny import random_windows, tiny_model, tiny_tokenizer


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model: its bad input must be found before."""
    import soco_llm.commands

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(soco_llm.commands, "load_model", refuse)


def _compress(model_dir, text_file, out, *extra, method="svd-llm"):
    return ["compress", "--method", method, "--ratio", "0.4", "--model", model_dir, "--out", out, "--calib",
            text_file, "--samples", "4", "--seq-len", "32", "--eval-data", text_file, "--eval-seq-len", "32",
            "--eval-windows", "2", *extra]


def _soco(model_dir, text_file, out, *sets):
    return _compress(model_dir, text_file, out, "--samples", "8", "--batch-size", "4", "--no-eval", "--set", "steps=4",
                     "whiten_samples=4", "checkpoint_every=2", *sets, method="soco")


def _compressed_folder(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "c"
    code, _, err = run(capsys, *_compress(model_dir, text_file, out, "--no-eval", method="svd"))
    assert code == 0, err
    return out


# Item 3: zero is zero, not a default.

@pytest.mark.parametrize("method", ["svd-llm", "soco"])
def test_zero_calibration_sizes_fail_at_once(capsys, model_dir, text_file, tmp_path, no_load, method):
    for option in ("--samples", "--seq-len", "--batch-size"):
        argv = _compress(model_dir, text_file, tmp_path / "o", method=method)
        code, _, err = run(capsys, *argv, option, "0")
        assert_one_line_error(code, err, option)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()
    calib = soco_llm.SVDLLMConfig().calibration("bundled", 0, num_samples=0, seq_len=0, batch_size=0)
    assert (calib.num_samples, calib.seq_len, calib.batch_size) == (0, 0, 0)
    with pytest.raises(SocoError, match="num_samples must be an integer >= 1; got 0"):
        calib.validate()


def test_alpha_zero_is_kept(tmp_path):
    from soco_llm.commands import method_kwargs

    args = build_parser().parse_args(["compress", "--method", "asvd", "--ratio", "0.4", "--out", str(tmp_path / "o"),
                                      "--alpha", "0"])
    assert method_kwargs(args)[0]["alpha"] == 0.0  # plain SVD, as asked; not the default 0.5


# Item 4: every config field's type and range, before anything is loaded.

@pytest.mark.parametrize("setting,needle", [
    ("steps=20.5", "steps must be an integer; got 20.5"), ("steps=abc", "steps must be an integer; got 'abc'"),
    ("checkpoint_every=0", "checkpoint_every must be an integer >= 1"), ("lr_scores=abc", "lr_scores must be"),
    ("seed=1.5", "seed must be an integer"), ("whiten_samples=0", "whiten_samples must be an integer >= 1"),
    ("teacher_topk=0", "teacher_topk must be an integer >= 1"), ('deviation="no"', "deviation must be true or false"),
    ("lr_scores=-1", "lr_scores must be > 0"), ("lr_scores=NaN", "finite"), ("alternate_every=0", "alternate_every"),
    ("size_weight=-1", "size_weight must be >= 0"), ("stage_steps=[60,0,-0.5]", "stage_steps"),
    ("final_temperature=5", "final_temperature"), ("basis=3", "basis must be"), ("run_dir=", "run_dir"),
    ("target_modules=[\"(\"]", "not a valid regular expression"), ("seed=-1", "seed must be an integer in [0"),
])
def test_bad_soco_setting_fails_before_loading(capsys, model_dir, text_file, tmp_path, no_load, setting, needle):
    argv = _compress(model_dir, text_file, tmp_path / "o", "--quick", "--set", setting, method="soco")
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()


@pytest.mark.parametrize("argv_tail,needle", [
    (["--method", "asvd", "--alpha", "-1"], "--alpha"), (["--method", "asvd", "--alpha", "nan"], "--alpha"),
    (["--method", "svd-llm", "--set", "jitter=0"], "jitter must be in (0, 1]"),
    (["--method", "svd-llm", "--set", "max_jitter_tries=1.5"], "max_jitter_tries must be an integer"),
    (["--method", "svd", "--set", "sequential=1"], "sequential must be true or false"),
])
def test_bad_baseline_setting_fails_before_loading(capsys, model_dir, text_file, tmp_path, no_load, argv_tail, needle):
    code, _, err = run(capsys, *_compress(model_dir, text_file, tmp_path / "o"), *argv_tail)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


# Item 5: one line instead of a traceback.

def test_device_auto_is_the_default_and_cuda_without_a_gpu_is_one_line(capsys, monkeypatch, model_dir, text_file,
                                                                         tmp_path, no_load):
    from soco_llm.runtime import resolve_device

    assert build_parser().parse_args(["eval"]).device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for device, needle in [("cuda", "use --device cpu"), ("cuda:0", "use --device cpu"), ("foo", "unknown device"),
                           ("cuda:x", "unknown device")]:
        code, _, err = run(capsys, *_compress(model_dir, text_file, tmp_path / "o"), "--device", device)
        assert_one_line_error(code, err, needle)
        code, _, err = run(capsys, "eval", model_dir, "--device", device)
        assert_one_line_error(code, err, needle)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SocoError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun each process takes its own GPU
    assert resolve_device("auto") == torch.device("cuda", 1)


@pytest.mark.parametrize("option,value", [("--eval-seq-len", "1"), ("--eval-windows", "-1"),
                                          ("--eval-batch-size", "0")])
def test_bad_eval_options_fail_before_loading(capsys, model_dir, text_file, tmp_path, no_load, option, value):
    code, _, err = run(capsys, "eval", model_dir, option, value)
    assert_one_line_error(code, err, option)
    code, _, err = run(capsys, *_compress(model_dir, text_file, tmp_path / "o"), option, value)
    assert_one_line_error(code, err, option)
    code, _, err = run(capsys, "export", "--from", tmp_path / "run", "--ratio", "0.5", "--out", tmp_path / "e",
                       option, value)
    assert_one_line_error(code, err, option)
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("report", ["{not json", "[1, 2]", '{"layers": [{"name": "x"}], "model_params_before": 1, '
                                    '"model_params_after": 1}', '{"layers": 3, "model_params_before": 1, '
                                    '"model_params_after": 1}'])
def test_info_with_a_damaged_report(capsys, model_dir, text_file, tmp_path, report):
    out = _compressed_folder(tmp_path, model_dir, text_file, capsys)
    (out / "compression_report.json").write_text(report)
    code, _, err = run(capsys, "info", out)
    assert_one_line_error(code, err, "compression_report.json")


def test_info_refuses_truncated_weights_and_bad_ranks(capsys, model_dir, text_file, tmp_path):
    out = _compressed_folder(tmp_path, model_dir, text_file, capsys)
    good = (out / "config.json").read_text()
    config = json.loads(good)
    name = next(iter(config["compression"]["ranks"]))
    config["compression"]["ranks"][name] = -3
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "info", out)
    assert_one_line_error(code, err, "rank")
    (out / "config.json").write_text(good)
    weights = out / FACTORED_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run(capsys, "info", out)
    assert_one_line_error(code, err, "corrupt or truncated")


def _fake_finished_run(tmp_path, meta_text):
    """A run folder whose run.json is `meta_text`; the tensor files only need to exist for these checks."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(meta_text)
    for name in ("basis.safetensors", "soco_scores.safetensors"):
        (run_dir / name).write_bytes(b"")
    return run_dir


@pytest.mark.parametrize("meta,needle", [
    ("{not json", "not valid JSON"), ('{"config": 1, "status": "done"}', "not a run record"),
    ('{"config": {"method": "soco", "ratio": 0.4, "no_such_key": 1}, "status": "done"}', "no_such_key"),
    ('{"config": {"method": "soco", "ratio": 0.4, "steps": "many"}, "status": "done"}', "steps must be an integer"),
])
def test_export_from_a_damaged_run(capsys, tmp_path, no_load, meta, needle):
    run_dir = _fake_finished_run(tmp_path, meta)
    code, _, err = run(capsys, "export", "--from", run_dir, "--ratio", "0.5", "--out", tmp_path / "e")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "e").exists()


def test_eval_refuses_an_unknown_format_version(capsys, model_dir, text_file, tmp_path):
    out = _compressed_folder(tmp_path, model_dir, text_file, capsys)
    config = json.loads((out / "config.json").read_text())
    config["compression"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "eval", out, "--eval-data", text_file, "--eval-seq-len", "32", "--eval-windows", "2")
    assert_one_line_error(code, err, "format version 99")


# Item 8: messages that say what is true.

def _interrupt_at(monkeypatch, module, name, call):
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return real


def test_ctrl_c_in_training_says_what_was_kept_and_how_to_continue(capsys, monkeypatch, model_dir, text_file,
                                                                   tmp_path):
    import soco_llm.core.teacher as teacher

    argv = [str(a) for a in _soco(model_dir, text_file, tmp_path / "s")]
    real = _interrupt_at(monkeypatch, teacher, "student_kl", 4)  # during step 4: steps 1-3 are done
    code, _, err = run(capsys, *argv)
    assert code == 130
    last = err.strip().splitlines()[-1]
    assert "nothing was written" not in err
    assert "checkpoint at step 3 of 4" in last and "continue with: soco compress" in last and last.endswith("--resume")
    monkeypatch.setattr(teacher, "student_kl", real)
    code, _, err = run(capsys, *argv)  # the plain command says exactly what to do
    assert_one_line_error(code, err, "pass --resume to continue it")
    code, stdout, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    assert "saved to" in stdout


def test_ctrl_c_before_training_leaves_a_run_that_resume_continues(capsys, monkeypatch, model_dir, text_file,
                                                                   tmp_path):
    import soco_llm.methods.soco.whole_model as whole_model

    argv = [str(a) for a in _soco(model_dir, text_file, tmp_path / "s")]
    real = _interrupt_at(monkeypatch, whole_model, "teacher_cache", 1)
    code, _, err = run(capsys, *argv)
    assert code == 130 and "keeps no training yet; continue with: soco compress" in err
    assert json.loads((tmp_path / "s.run" / "run.json").read_text())["status"] == "running"
    monkeypatch.setattr(whole_model, "teacher_cache", real)
    code, _, err = run(capsys, *argv)
    line = assert_one_line_error(code, err, "--resume")
    assert "no training yet" in line and "rm -r" in line
    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0, err


def test_ctrl_c_elsewhere_claims_only_what_is_true(capsys, monkeypatch, model_dir, text_file, tmp_path):
    import soco_llm.commands

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(soco_llm.commands, "load_model", interrupted)
    code, _, err = run(capsys, *_compress(model_dir, text_file, tmp_path / "o"))
    assert code == 130 and "no output folder is left half-written" in err and "nothing was written" not in err


def test_rerun_of_a_finished_run_and_resume_with_other_settings(capsys, model_dir, text_file, tmp_path):
    argv = [str(a) for a in _soco(model_dir, text_file, tmp_path / "s")]
    assert run(capsys, *argv)[0] == 0
    code, _, err = run(capsys, *argv[:-1], "--overwrite", "--set", "steps=4", "whiten_samples=4")
    assert_one_line_error(code, err, "soco export --from")
    code, _, err = run(capsys, *argv, "--overwrite", "--resume", "--set", "lr_scores=0.5")
    assert_one_line_error(code, err, "lr_scores=0.005 (now 0.5)")
    (tmp_path / "s.run" / "run.json").write_text("{broken")
    code, _, err = run(capsys, *argv, "--overwrite", "--resume")
    assert_one_line_error(code, err, "not valid JSON")


def test_nan_loss_message_gives_advice_that_works(tmp_path, monkeypatch):
    import soco_llm.core.teacher as teacher

    real = teacher.student_kl
    monkeypatch.setattr(teacher, "student_kl", lambda *a: real(*a) * float("nan"))
    cfg = soco_llm.SoCoConfig(ratio=0.4, steps=4, batch_size=4, run_dir=str(tmp_path / "r"))
    with pytest.raises(SocoError, match="lower learning rate") as e:
        soco_llm.compress(tiny_model("llama"), cfg, random_windows(8, 32), heal_config=soco_llm.HealConfig())
    assert "--resume" not in str(e.value)  # resuming repeats the same steps


def test_nan_weights_are_named_not_blamed_on_the_dtype(capsys, text_file, tmp_path):
    from soco_llm.core.stats import nonfinite_inputs_error

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SocoError, match="weight model.layers.1.mlp.up_proj.weight") as e:
        soco_llm.compress(model, soco_llm.SVDLLMConfig(ratio=0.4), random_windows())
    assert "dtype" not in str(e.value)
    assert "--dtype float32" in str(nonfinite_inputs_error(tiny_model("llama"), "x", torch.bfloat16))
    assert "dtype" not in str(nonfinite_inputs_error(tiny_model("llama"), "x", torch.float32))
    save_dense(model, tiny_tokenizer(), tmp_path / "nan-model")
    code, _, err = run(capsys, "eval", tmp_path / "nan-model", "--eval-data", text_file)
    assert_one_line_error(code, err, "model.layers.1.mlp.up_proj.weight")


def test_text_too_short_names_the_option_that_set_the_length(capsys, model_dir, tmp_path):
    short = tmp_path / "short.txt"  # 100 tokens: too short for one window of 200, which the model can read
    short.write_text("A few words of text, " * 5)
    code, _, err = run(capsys, "eval", model_dir, "--eval-data", short, "--eval-seq-len", "200")
    assert_one_line_error(code, err, "smaller --eval-seq-len")
    code, _, err = run(capsys, *_compress(model_dir, short, tmp_path / "o", "--no-eval"), "--seq-len", "200")
    assert_one_line_error(code, err, "smaller --seq-len")


@pytest.mark.parametrize("content,needle", [(bytes(range(256)) * 4, "binary file"),
                                            ("café ".encode("latin-1") * 50, "not UTF-8 text"),
                                            (b"  \n", "is empty")])
def test_text_that_is_not_text_is_refused_before_loading(capsys, model_dir, text_file, tmp_path, no_load, content,
                                                         needle):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    code, _, err = run(capsys, *_compress(model_dir, text_file, tmp_path / "o"), "--calib", bad)
    assert_one_line_error(code, err, needle)
    code, _, err = run(capsys, *_compress(model_dir, text_file, tmp_path / "o"), "--eval-data", bad)
    assert_one_line_error(code, err, "--eval-data")
    code, _, err = run(capsys, "eval", model_dir, "--eval-data", bad)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_output_folder_checks(capsys, model_dir, text_file, tmp_path, no_load):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    code, _, err = run(capsys, *_compress(model_dir, text_file, other), "--overwrite")
    assert_one_line_error(code, err, "replaces model folders only")
    code, _, err = run(capsys, *_compress(model_dir, text_file, model_dir), "--overwrite")
    assert_one_line_error(code, err, "also an input")
    code, _, err = run(capsys, *_compress(model_dir, text_file, text_file))
    assert_one_line_error(code, err, "is a file")
    assert (other / "mine.txt").read_text() == "keep me"


def test_clean_calls_clean_stale(capsys, monkeypatch, tmp_path):
    from soco_llm.io import atomic

    calls = []

    def fake(path, dry_run=False):
        calls.append((path, dry_run))
        return [path.with_name(".x.tmp-1")]

    monkeypatch.setattr(atomic, "clean_stale", fake, raising=False)
    code, out, _ = run(capsys, "clean", tmp_path / "x", "--dry-run")
    assert code == 0 and calls == [(tmp_path / "x", True)] and "would clean up" in out and ".x.tmp-1" in out
    (tmp_path / "f").write_text("")
    code, _, err = run(capsys, "clean", tmp_path / "f")
    assert_one_line_error(code, err, "is a file")


def test_clean_removes_what_a_killed_save_left(capsys, tmp_path):
    from soco_llm.io import atomic

    if not hasattr(atomic, "clean_stale"):  # written by another change; the CLI's wiring is tested above
        pytest.skip("soco_llm.io.atomic.clean_stale is not there yet")
    out = tmp_path / "out"
    out.mkdir()
    stale = tmp_path / ".out.soco-tmp-999999999-0-abcd1234"  # a pid that no process has
    stale.mkdir()
    code, stdout, err = run(capsys, "clean", out)
    assert code == 0, err
    assert not stale.exists() and out.is_dir() and str(stale.name) in stdout
