"""The `soco` command end to end on a tiny model, and every bad-input case: one line, non-zero exit."""

import json
import subprocess
import sys

import pytest
import torch

from soco_llm import save_dense
from soco_llm.cli import main
from soco_llm.io.format import FACTORED_WEIGHTS
import clirun
from tiny import tiny_model, tiny_tokenizer


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def compress_args(model_dir, text_file, out, *extra):
    return ["compress", "--method", "svd-llm", "--ratio", "0.4", "--model", model_dir, "--out", out,
            "--calib", text_file, "--samples", "4", "--seq-len", "32", "--eval-data", text_file,
            "--eval-seq-len", "32", "--eval-windows", "2", *extra]


def test_compress_eval_info_export(capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "c"
    code, stdout, err = run(capsys, *compress_args(model_dir, text_file, out))
    assert code == 0, err
    assert "dense" in stdout and "svd-llm" in stdout and "perplexity" in stdout
    assert (out / FACTORED_WEIGHTS).is_file() and (out / "tokenizer.json").is_file()

    code, stdout, _ = run(capsys, "eval", out, "--eval-data", text_file, "--eval-seq-len", "32", "--eval-windows", "2")
    assert code == 0 and "perplexity" in stdout and "tokens" in stdout

    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "achieved ratio: 0.4" in stdout and "model.layers.1.mlp.down_proj" in stdout

    code, stdout, _ = run(capsys, "export-dense", out, "--out", tmp_path / "d")
    assert code == 0 and json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == "llama"


def test_generate_on_a_saved_compressed_folder(capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "c"
    assert run(capsys, *compress_args(model_dir, text_file, out, "--no-eval"))[0] == 0
    code, stdout, err = run(capsys, "generate", out, "--prompt", "The quick brown fox", "--max-new-tokens", "6")
    assert code == 0, err
    assert "6 new tokens after a" in stdout and "tokens/s" in stdout
    code, _, err = run(capsys, "generate", out, "--prompt", "")
    _one_line_error(code, err, "prompt is empty")
    code, _, err = run(capsys, "generate", out, "--chat")  # the tiny tokenizer has no chat template
    _one_line_error(code, err, "no chat template")


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "soco_llm.cli", "compress", "--method", "svd", "--ratio", "2",
                        "--out", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "ratio must be in (0, 1)" in r.stderr


def _one_line_error(code, err, needle):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("soco") or "error" in ln]
    assert len(lines) == 1, err
    assert needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2", "abc"])
def test_ratio_out_of_range(capsys, ratio, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["compress", "--method", "svd", "--ratio", ratio, "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    _one_line_error(e.value.code, err, "ratio must be")


def test_unknown_method(capsys, model_dir, tmp_path):
    code, _, err = run(capsys, "compress", "--method", "magic", "--ratio", "0.4", "--model", model_dir,
                       "--out", tmp_path / "o")
    _one_line_error(code, err, "unknown method 'magic'")
    assert not (tmp_path / "o").exists()


def test_missing_model_folder(capsys, tmp_path):
    code, _, err = run(capsys, "compress", "--method", "svd", "--ratio", "0.4", "--model", tmp_path / "nope",
                       "--out", tmp_path / "o")
    _one_line_error(code, err, "not found")
    code, _, err = run(capsys, "info", tmp_path / "nope")
    _one_line_error(code, err, "not found")


def test_corrupt_folders(capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "c"
    assert run(capsys, *compress_args(model_dir, text_file, out, "--no-eval"))[0] == 0
    weights = out / FACTORED_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    code, _, err = run(capsys, "eval", out)
    _one_line_error(code, err, "corrupt")
    (out / "config.json").write_text("{not json")
    code, _, err = run(capsys, "info", out)
    _one_line_error(code, err, "not valid JSON")
    code, _, err = run(capsys, "info", model_dir)
    _one_line_error(code, err, "not a soco-llm compressed model")


def test_no_target_linears(capsys, model_dir, text_file, tmp_path):
    code, _, err = run(capsys, *compress_args(model_dir, text_file, tmp_path / "o", "--target-modules", "no_such_layer"))
    _one_line_error(code, err, "no target linear layers")
    assert not (tmp_path / "o").exists()


def test_nan_activations(capsys, text_file, tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.fill_(float("nan"))  # NaN into the MLP
    save_dense(model, tiny_tokenizer(), tmp_path / "nan-model")
    code, _, err = run(capsys, *compress_args(tmp_path / "nan-model", text_file, tmp_path / "o", "--no-eval"))
    _one_line_error(code, err, "NaN or inf")
    assert not (tmp_path / "o").exists()


def test_calibration_text_too_short(capsys, model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hi")
    code, _, err = run(capsys, "compress", "--method", "svd-llm", "--ratio", "0.4", "--model", model_dir,
                       "--out", tmp_path / "o", "--calib", short, "--no-eval")
    _one_line_error(code, err, "text too short")
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    code, _, err = run(capsys, *compress_args(model_dir, text_file, out, "--no-eval"))
    _one_line_error(code, err, "--overwrite")
    assert list(out.iterdir()) == []
    code, _, _ = run(capsys, *compress_args(model_dir, text_file, out, "--no-eval", "--overwrite"))
    assert code == 0 and (out / "config.json").is_file()


def test_soco_compress_resume_and_export(capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "s"
    args = ["compress", "--method", "soco", "--ratio", "0.4", "--model", model_dir, "--out", out,
            "--calib", text_file, "--samples", "8", "--seq-len", "32", "--batch-size", "4", "--eval-data", text_file,
            "--eval-seq-len", "32", "--eval-windows", "2", "--set", "steps=4", "whiten_samples=4"]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert "soco: target ratio 0.400" in stdout and (out / "soco_scores.safetensors").is_file()
    assert json.loads((tmp_path / "s.run" / "run.json").read_text())["status"] == "done"
    # The run folder is not silently reused.
    code, _, err = run(capsys, *args[:-3], "--overwrite", "--set", "steps=4", "whiten_samples=4")
    _one_line_error(code, err, "--resume")
    code, stdout, err = run(capsys, "export", "--from", tmp_path / "s.run", "--ratio", "0.6", "--out", tmp_path / "e",
                            "--eval-data", text_file, "--eval-seq-len", "32", "--eval-windows", "2")
    assert code == 0, err
    assert "target ratio 0.600" in stdout
    code, stdout, _ = run(capsys, "info", tmp_path / "e")
    assert code == 0 and "method: soco" in stdout


@pytest.mark.parametrize("sets,needle", [(["steps=10", "stage_steps=[1,2,3]"], "adding up"),
                                         (["no_such_field=1"], "no setting")])
def test_soco_bad_settings(capsys, model_dir, tmp_path, sets, needle):
    code, _, err = run(capsys, "compress", "--method", "soco", "--ratio", "0.4", "--model", model_dir,
                       "--out", tmp_path / "o", "--set", *sets)
    _one_line_error(code, err, needle)


def test_export_from_missing_run(capsys, tmp_path):
    code, _, err = run(capsys, "export", "--from", tmp_path / "nope", "--ratio", "0.5", "--out", tmp_path / "o")
    _one_line_error(code, err, "not a finished run folder")


def test_baseline_printed_side_by_side(capsys, model_dir, text_file, tmp_path):
    code, stdout, err = run(capsys, *compress_args(model_dir, text_file, tmp_path / "o", "--baseline", "svd"))
    assert code == 0, err
    last = stdout.strip().splitlines()[-1]
    assert "dense:" in last and "svd:" in last and "svd-llm:" in last


def test_compress_with_healing_keeps_the_ranks(capsys, model_dir, text_file, tmp_path):
    code, _, err = run(capsys, *compress_args(model_dir, text_file, tmp_path / "plain", "--no-eval"))
    assert code == 0, err
    code, _, err = run(capsys, *compress_args(model_dir, text_file, tmp_path / "healed", "--no-eval",
                                              "--heal-steps", "3", "--heal-lr", "1e-3"))
    assert code == 0, err
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())["compression"]
    healed = json.loads((tmp_path / "healed" / "config.json").read_text())["compression"]
    assert healed["ranks"] == plain["ranks"] and healed["achieved_ratio"] == plain["achieved_ratio"]
    assert healed["config"]["heal"]["steps"] == 3 and healed["config"]["heal"]["final_kl"] is not None
    assert (tmp_path / "healed.heal" / "checkpoint.json").is_file()
    code, _, err = run(capsys, *compress_args(model_dir, text_file, tmp_path / "adapted", "--no-eval", "--heal-steps",
                                              "3", "--heal-lr", "1e-3", "--heal-mode", "adapter", "--heal-adapter-rank", "2"))
    assert code == 0, err
    adapted = json.loads((tmp_path / "adapted" / "config.json").read_text())["compression"]
    assert adapted["ranks"] == plain["ranks"] and adapted["config"]["heal"]["mode"] == "adapter"
    assert adapted["config"]["heal"]["adapter_rank"] == 2
    for bad, option in (("-1", "--heal-steps"), ("0", "--heal-adapter-rank")):
        code, _, err = clirun.run(capsys, *compress_args(model_dir, text_file, tmp_path / "x", option, bad))
        clirun.assert_one_line_error(code, err, option)
        assert not (tmp_path / "x").exists()


def test_soco_heals_by_default_and_the_other_methods_do_not(tmp_path):
    from soco_llm.cli import build_parser
    from soco_llm.command_stages import heal_config
    from soco_llm.methods import SoCoConfig, SVDLLMConfig

    def chosen(config, *options):
        args = build_parser().parse_args(["compress", "--method", config.method, "--ratio", "0.4", "--out",
                                          str(tmp_path / "o"), *options])
        cfg = heal_config(args, 0, config.heal_defaults())
        return cfg.steps, cfg.lr

    assert chosen(SoCoConfig()) == (60, 3e-5)  # measured: benchmarks/results/heal/
    assert chosen(SoCoConfig(blockwise=True))[0] == 0  # no cached teacher; for models whose whole run does not fit
    assert chosen(SoCoConfig(**SoCoConfig.presets["quick"]))[0] == 0  # a short run asked for (and its export)
    assert chosen(SVDLLMConfig()) == (0, 1e-4) and chosen(SVDLLMConfig(), "--heal-steps", "5") == (5, 1e-4)
    assert chosen(SoCoConfig(), "--heal-steps", "0", "--heal-lr", "1e-4") == (0, 1e-4)  # the user's word wins


def test_soco_with_healing_reads_its_own_cached_teacher(capsys, model_dir, text_file, tmp_path, monkeypatch):
    import sys

    import soco_llm.methods.soco.whole_model as whole_model

    compress_module = sys.modules["soco_llm.compress"]  # the module: `soco_llm.compress` is the function
    calls = {"n": 0}
    real = whole_model.teacher_cache

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(whole_model, "teacher_cache", counting)
    monkeypatch.setattr(compress_module, "teacher_cache", counting)
    code, _, err = clirun.run(capsys, "compress", "--method", "soco", "--ratio", "0.4", "--model", model_dir,
                              "--out", tmp_path / "s", "--calib", text_file, "--set", "steps=4", "--no-eval",
                              "--heal-steps", "2")
    assert code == 0, err
    assert calls["n"] == 1  # SoCo's own teacher, on the very windows healing uses, is read back, not recomputed
    heal = json.loads((tmp_path / "s" / "config.json").read_text())["compression"]["config"]["heal"]
    assert heal["steps"] == 2 and heal["final_kl"] is not None


def test_healing_reports_before_and_after_with_heldout_kl_on_two_texts(capsys, model_dir, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(text_file.read_text().split())))  # a second text no method trains on
    argv = compress_args(model_dir, text_file, tmp_path / "h", "--heal-steps", "3", "--heal-lr", "1e-3")
    argv[argv.index("--eval-data") + 1:argv.index("--eval-data") + 2] = [text_file, other]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert "held-out KL to dense" in stdout
    comp = json.loads((tmp_path / "h" / "config.json").read_text())["compression"]
    ev = comp["config"]["eval"]
    assert set(ev) == {"dense", "before_heal", "compressed"}
    for stage in ev.values():
        assert set(stage) == {str(text_file), str(other)}
    assert ev["dense"][str(other)]["kl"] is None  # the reference itself
    before, after = ev["before_heal"][str(text_file)], ev["compressed"][str(text_file)]
    assert before["kl"] > 0 and after["kl"] > 0 and before["tokens"] == after["tokens"]
    assert comp["config"]["heal"]["seconds"] > 0
    tables = [line for line in stdout.splitlines() if line.startswith("  dense:")]
    assert len(tables) == 2 and all("svd-llm:" in t and "svd-llm+heal:" in t for t in tables)


def test_healing_checkpoint_is_resumed_or_refused_never_restarted(capsys, model_dir, text_file, tmp_path):
    argv = compress_args(model_dir, text_file, tmp_path / "h", "--no-eval", "--heal-steps", "2")
    assert run(capsys, *argv)[0] == 0
    code, _, err = clirun.run(capsys, *argv, "--overwrite")  # the checkpoint in h.heal is work: not redone unasked
    clirun.assert_one_line_error(code, err, "--resume")
    code, _, err = run(capsys, *argv, "--overwrite", "--resume")  # svd-llm trains nothing else: --resume is healing's
    assert code == 0, err


def test_export_heals_a_soco_run_with_its_cached_teacher(capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "s"
    code, _, err = run(capsys, "compress", "--method", "soco", "--ratio", "0.4", "--model", model_dir, "--out", out,
                       "--calib", text_file, "--set", "steps=4", "num_samples=6", "seq_len=32", "--no-eval")
    assert code == 0, err
    run_dir = tmp_path / "s.run"
    code, stdout, err = run(capsys, "export", "--from", run_dir, "--ratio", "0.5", "--out", tmp_path / "e",
                            "--heal-steps", "2", "--eval-data", text_file, "--eval-seq-len", "32", "--eval-windows", "2")
    assert code == 0, err
    assert "soco " in stdout and "soco+heal " in stdout  # before and after healing, on the same windows
    code, _, err = run(capsys, "export", "--from", run_dir, "--ratio", "0.5", "--out", tmp_path / "p", "--no-eval")
    assert code == 0, err
    healed, plain = (json.loads((tmp_path / n / "config.json").read_text())["compression"] for n in ("e", "p"))
    assert healed["ranks"] == plain["ranks"] and healed["achieved_ratio"] == plain["achieved_ratio"]
    assert healed["config"]["heal"]["steps"] == 2 and healed["config"]["heal"]["final_kl"] is not None
    (run_dir / "teacher.safetensors").unlink()
    code, _, err = clirun.run(capsys, "export", "--from", run_dir, "--ratio", "0.5", "--out", tmp_path / "y",
                              "--no-eval", "--heal-steps", "2")
    clirun.assert_one_line_error(code, err, "teacher")
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("env,applied", [(None, False), ("1", True)])
def test_host_memory_is_kept_only_when_asked(capsys, monkeypatch, env, applied):
    import platform

    import soco_llm.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_host_memory", lambda: calls.append(1) or True)
    if env is None:
        monkeypatch.delenv("SOCO_KEEP_HOST_MEMORY", raising=False)
    else:
        monkeypatch.setenv("SOCO_KEEP_HOST_MEMORY", env)
    code, _, err = run(capsys, "info", "/nonexistent-folder")
    assert code == 2 and len(calls) == int(applied)
    if platform.libc_ver()[0] == "glibc":  # mallopt takes both settings (in a process of its own: it is global)
        probe = "from soco_llm.runtime import keep_freed_host_memory as k; raise SystemExit(0 if k() else 1)"
        assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


@pytest.mark.parametrize("dtype,expected", [("auto", torch.float16), ("float32", torch.float32)])
def test_dtype_auto_keeps_the_checkpoints_dtype(capsys, text_file, tmp_path, dtype, expected):
    """A float16 checkpoint (as many Llama-2 and OPT ones are) compressed with SoCo: `--dtype auto` trains and
    saves it in float16; an explicit dtype converts it."""
    from safetensors import safe_open

    folder = tmp_path / "fp16-llama"
    save_dense(tiny_model("llama").to(torch.float16), tiny_tokenizer(), folder)
    out = tmp_path / "c"
    code, stdout, err = run(capsys, "compress", "--method", "soco", "--ratio", "0.4", "--model", folder, "--out", out,
                            "--calib", text_file, "--samples", "8", "--seq-len", "32", "--set", "steps=3",
                            "--set", "batch_size=4", "--heal-steps", "0", "--eval-data", text_file,
                            "--eval-seq-len", "32", "--eval-windows", "2", "--dtype", dtype)
    assert code == 0, err
    assert "soco" in stdout and "nan" not in stdout.lower()
    with safe_open(str(out / FACTORED_WEIGHTS), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.endswith((".A.weight", ".B.weight"))}
    assert dtypes == {expected}


def test_a_bf16_run_exports_and_resumes_in_its_own_dtype(capsys, model_dir, text_file, tmp_path):
    """The run folder records the dtype it trained in: `soco export` cuts it in that dtype (the checkpoint is
    float32; it crashed on the mixed dtypes before), also for a folder older than that record (the basis file
    says), and a resumption in another dtype is refused in one line."""
    from safetensors import safe_open

    out, run_dir = tmp_path / "s", tmp_path / "s.run"
    args = ["compress", "--method", "soco", "--ratio", "0.4", "--model", model_dir, "--out", out, "--calib", text_file,
            "--samples", "8", "--seq-len", "32", "--batch-size", "4", "--heal-steps", "0", "--no-eval",
            "--set", "steps=3"]
    code, _, err = run(capsys, *args, "--dtype", "bfloat16")
    assert code == 0, err
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["dtype"] == "bfloat16"
    code, _, err = run(capsys, *args, "--overwrite", "--resume", "--dtype", "float32")
    _one_line_error(code, err, "was made in bfloat16")

    del meta["dtype"]  # as written before the dtype was recorded
    (run_dir / "run.json").write_text(json.dumps(meta))
    code, stdout, err = run(capsys, "export", "--from", run_dir, "--ratio", "0.6", "--out", tmp_path / "e",
                            "--eval-data", text_file, "--eval-seq-len", "32", "--eval-windows", "2")
    assert code == 0, err
    assert "target ratio 0.600" in stdout and "nan" not in stdout.lower()
    with safe_open(str(tmp_path / "e" / FACTORED_WEIGHTS), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith((".A.weight", ".B.weight"))} == {torch.bfloat16}
