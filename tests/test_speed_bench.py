"""The speed benchmark (benchmarks/harness timing, shapes, tables) and its scripts on a tiny model: seconds,
numbers only sanity-checked."""

import importlib.util
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

from soco_llm import compress
from soco_llm.errors import SocoError
from soco_llm.methods.svd_family import SVDConfig
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the harness, as the scripts import it
from harness import shapes  # noqa: E402
from harness.sizes import decode_limit, weight_stats  # noqa: E402
from harness.tables import crossover_table, speed_table  # noqa: E402
from harness.timing import BenchSettings, add_speedups, bench_models, combine_processes, layer_crossover  # noqa: E402

TINY = BenchSettings(prefill_lengths=[8, 16], decode_prompt=8, new_tokens=3, warmup=0, repeats=1, threads=1)
TINY_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weight_stats_and_decode_limit():
    dense = tiny_model("llama")
    before = weight_stats(dense)
    emb = dense.get_input_embeddings().weight.numel()
    tied = dense.get_output_embeddings().weight is dense.get_input_embeddings().weight
    assert before["decode_params"] == before["params"] - (0 if tied else emb)
    assert before["weight_bytes"] == 4 * before["params"] and before["low_rank_layers"] == 0
    model = tiny_model("llama")
    report = compress(model, SVDConfig(ratio=0.4))
    after = weight_stats(model)
    assert after["low_rank_layers"] == 14 and after["linear_params"] < before["linear_params"]
    assert after["params"] == report.model_params_after
    limit = decode_limit(before, after)
    assert limit == pytest.approx(before["decode_params"] / after["decode_params"]) and limit > 1


def test_bench_models_rows_and_table():
    torch.set_num_threads(1)
    dense, compressed = tiny_model("llama"), tiny_model("llama")
    compress(compressed, SVDConfig(ratio=0.4))
    rows = bench_models([(dense, 0), (compressed, 0)], TINY)
    for r, label, ratio in zip(rows, ["dense", "svd 0.4"], [None, 0.4]):
        r.update(label=label, model="tiny", ratio=ratio, achieved_ratio=ratio or 0.0, torch_threads=1)
    rows = add_speedups(rows)
    for r in rows:
        assert set(r["prefill_tok_s"]) == {"8", "16"} and all(v > 0 for v in r["prefill_tok_s"].values())
        assert r["decode_tok_s"] > 0 and r["decode_tok_s_cpu"] > 0 and r["working_mib"] >= 0
        assert len(r["times"]["generate@N"]) == TINY.repeats
    assert rows[0]["decode_speedup"] == 1.0 and rows[1]["decode_limit"] > 1
    table = speed_table(rows, {"cpu": "test", "usable_cpus": 1, "torch": torch.__version__, "device": "cpu"}, TINY)
    assert "| dense |" in table and "| svd 0.4 |" in table and "decode limit" in table

    # two processes' rows of the same models: medians of each, ratios recomputed, the spread kept
    combined = combine_processes([rows, rows])
    assert [r["decode_speedup_per_process"] for r in combined] == [[1.0, 1.0], [rows[1]["decode_speedup"]] * 2]
    assert combined[1]["decode_speedup"] == pytest.approx(rows[1]["decode_speedup"])
    assert "decode × per process" in speed_table(combined, {"cpu": "test", "usable_cpus": 1, "torch": "2",
                                                            "device": "cpu"}, TINY)
    with pytest.raises(SocoError, match="different models"):
        combine_processes([rows, rows[::-1]])


def test_layer_crossover_rows():
    rows = layer_crossover([(32, 48)], ratio=0.4, token_counts=[1, 16], threads=1, min_run_time=0.01)
    assert [r["tokens"] for r in rows] == [1, 16] and all(r["dense"] > 0 and r["merged"] > 0 for r in rows)
    assert rows[0]["rank"] == int(32 * 48 * 0.6 // 80)
    assert "factored / dense" in crossover_table(rows)


def test_speed_script_writes_json_and_markdown(model_dir, tmp_path, capsys):
    speed = load_script("speed")
    out_json, out_md = tmp_path / "r" / "speed.json", tmp_path / "r" / "speed.md"
    assert speed.main(["--model", str(model_dir), "--ratios", "0.4", "0.6", "--threads", "1", "--prefill-lengths", "8",
                       "--decode-prompt", "8", "--new-tokens", "3", "--repeats", "2", "--warmup", "0",
                       "--json", str(out_json), "--markdown", str(out_md)]) == 0
    result = json.loads(out_json.read_text())
    assert result["hardware"]["torch"] == torch.__version__ and result["settings"]["repeats"] == 2
    assert [r["label"] for r in result["results"]] == ["dense", "svd 0.4", "svd 0.6"]
    assert result["results"][2]["achieved_ratio"] > result["results"][1]["achieved_ratio"] > 0.39
    assert out_md.read_text() in capsys.readouterr().out
    assert not list(out_json.parent.glob(".*tmp*"))  # atomic writes leave no temporaries
    # what was run and how the allocator was set travel with the numbers
    assert "python benchmarks/speed.py --model" in result["command"] and result["date"]
    assert f"Command: `{result['command']}`" in out_md.read_text()
    tuned = result["settings"]["malloc_tuning"]
    assert ("glibc keeps freed heap" if tuned else "the C library's defaults") in out_md.read_text()
    if platform.libc_ver()[0] == "glibc":
        assert tuned


def test_speed_script_bad_input(capsys):
    speed = load_script("speed")
    with pytest.raises(SystemExit):
        speed.main(["--ratios", "1.5"])
    assert "ratio must be in (0, 1)" in capsys.readouterr().err


def test_speed_script_times_a_public_shape_with_random_weights(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(shapes.SHAPES, "tiny-test", TINY_SHAPE)
    speed = load_script("speed")
    out_json = tmp_path / "speed.json"
    assert speed.main(["--model", "shape:tiny-test", "--ratios", "0.4", "--threads", "1", "--prefill-lengths", "8",
                       "--decode-prompt", "8", "--new-tokens", "3", "--repeats", "1", "--warmup", "0",
                       "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["results"]
    assert [r["label"] for r in rows] == ["dense", "svd 0.4"] and rows[1]["low_rank_layers"] == 14
    assert rows[0]["params"] == shapes.random_model("tiny-test").num_parameters()
    assert "random weights in that public model's shape" in capsys.readouterr().out
    assert speed.main(["--model", "shape:no-such-model", "--ratios", "0.4"]) == 2
    assert "unknown model shape 'no-such-model'; choose one of" in capsys.readouterr().err


def test_decode_profile_groups_a_decode_step(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(shapes.SHAPES, "tiny-test", TINY_SHAPE)
    profile = load_script("decode_profile")
    assert profile.group_of("aten::mm") == "linears (mm, addmm)" and profile.group_of("aten::cat").startswith("concat")
    assert profile.group_of("aten::rsqrt") == profile.OTHER
    out_json, out_md = tmp_path / "p" / "profile.json", tmp_path / "p" / "profile.md"
    assert profile.main(["--model", "shape:tiny-test", "--ratio", "0.4", "--decode-prompt", "8", "--new-tokens", "3",
                         "--repeats", "1", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    data = json.loads(out_json.read_text())
    dense, comp = data["rows"]["dense"], data["rows"]["svd 0.4"]
    for row in (dense, comp):  # the groups add up to the profiled step
        parts = sum(v for k, v in row.items() if not k.startswith("whole step"))
        assert parts == pytest.approx(row[profile.STEP])
    for calls in data["calls"].values():  # what ran, not how long it took (a derived time may be < 0 under load)
        assert calls["linears (mm, addmm)"] > 0
    assert data["summary"]["weight-bandwidth limit"] > 1
    assert data["summary"]["linears alone"] == pytest.approx(dense["linears (mm, addmm)"] / comp["linears (mm, addmm)"])
    assert out_md.read_text() in capsys.readouterr().out and "| linears (mm, addmm) |" in out_md.read_text()
    assert profile.main(["--ratio", "1.2"]) == 2 and "--ratio must be in (0, 1)" in capsys.readouterr().err


def test_decode_profile_of_the_fast_path_names_the_compiled_graph(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(shapes.SHAPES, "tiny-test", TINY_SHAPE)
    profile = load_script("decode_profile")
    assert profile.group_of("TorchDynamo Cache Lookup") == "Dynamo guard checks"
    assert profile.group_of("## Call CompiledFxGraph fabc ##").startswith("compiled graph")
    out_json = tmp_path / "profile.json"
    assert profile.main(["--model", "shape:tiny-test", "--ratio", "0.4", "--decode-prompt", "8", "--new-tokens", "3",
                         "--repeats", "1", "--fast", "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert data["facts"]["fast"] is True and "on the fast path" in capsys.readouterr().out
    # Decode steps ran in the compiled graph, their matmuls still aten::mm: asserted on the ops that ran, never on
    # their times (a derived time is a difference of two timings and can come out below 0 on a loaded machine).
    assert set(data["calls"]) == set(data["rows"])
    for calls in data["calls"].values():
        assert calls["compiled graph (fused kernels, wrapper)"] > 0 and calls["linears (mm, addmm)"] > 0


def test_speed_script_combines_fresh_processes(model_dir, tmp_path):
    speed = load_script("speed")
    assert speed.strip_options(["--ratios", "0.4", "--processes", "3", "--json", "a.json", "--markdown=b.md"]) == [
        "--ratios", "0.4"]
    out_json, out_md = tmp_path / "speed.json", tmp_path / "speed.md"
    assert speed.main(["--model", str(model_dir), "--ratios", "0.4", "--threads", "1", "--prefill-lengths", "8",
                       "--decode-prompt", "8", "--new-tokens", "3", "--repeats", "1", "--warmup", "0",
                       "--processes", "2", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    result = json.loads(out_json.read_text())
    dense, comp = result["results"]
    assert result["settings"]["processes"] == 2 and len(comp["times"]) == 2
    assert len(comp["decode_speedup_per_process"]) == 2 and dense["decode_speedup_per_process"] == [1.0, 1.0]
    assert comp["decode_speedup"] == pytest.approx(dense["decode_ms_per_token"] / comp["decode_ms_per_token"])
    text = out_md.read_text()
    assert "decode × per process" in text and "the median over 2 such processes" in text


def test_gpu_check_runs_its_path_on_the_cpu(monkeypatch, tmp_path, model_dir, capsys):
    monkeypatch.setitem(shapes.SHAPES, "tiny-test", TINY_SHAPE)
    check = load_script("gpu_check")
    monkeypatch.setattr(check, "SHAPES", shapes.SHAPES)
    assert check.main(["--device", "cpu", "--model", str(model_dir), "--steps", "2", "--eval-windows", "1",
                       "--shape", "tiny-test", "--shape-steps", "2", "--shape-samples", "4", "--heal-steps", "2",
                       "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_check_cpu.json").read_text())["rows"]
    # the method rows, then SVD-LLM quantized on the device's kernels (int4 needs ranks of 16, more than this tiny
    # model's k_proj keeps, so its row is skipped with a line that says why)
    assert [r["row"].split(" @")[0] for r in rows] == ["svd-llm", "soco", "soco + heal", "soco", "svd-llm", "svd-llm"]
    assert ["plain" in rows[4]["row"], "int8" in rows[5]["row"]] == [True, True]
    assert "int4 row skipped" in capsys.readouterr().err
    assert rows[2]["perplexity"] > 0 and rows[2]["s_per_step"] > 0
    assert set(rows[1]["phases_s"]) == {"teacher", "basis", "training", "cut"} and rows[1]["s_per_step"] > 0
    assert "| soco @ 0.4" in (tmp_path / "gpu_check_cpu.md").read_text()
    if not torch.cuda.is_available():
        assert check.main(["--device", "cuda"]) == 2 and "no CUDA device here" in capsys.readouterr().err


def test_train_step_bench_times_the_step_variants_side_by_side(model_dir, tmp_path):
    out = tmp_path / "step.md"
    load_script("train_step").main(["--model", str(model_dir), "--steps", "2", "--repeats", "1", "--threads", "1",
                                    "--variants", "library", "whole-logits", "full-product", "--markdown", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "s / step" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| library (chunked head KL, kept components only on the CPU)",
                                                 "| whole-batch logits (before the chunked head)",
                                                 "| whole logits, full masked product (as on GPUs)"]
    kls = [float(r.split(" | ")[-1].rstrip(" |")) for r in rows]
    assert kls[1:] == pytest.approx([kls[0]] * 2, rel=1e-4, abs=2e-6)  # one step, three ways (6 decimals shown)
    assert all(float(r.split(" | ")[1]) > 0 for r in rows)


def test_sibling_gemm_bench_times_both_forms_of_each_group(tmp_path):
    out = tmp_path / "siblings.md"
    load_script("sibling_gemm").main(["--tokens", "1", "--threads", "1", "--min-run-time", "0.01", "--markdown",
                                      str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| q/k/v") or
            line.startswith("| gate/up")]
    assert [r[0] for r in rows] == ["| q/k/v (ranks 172/86/86)", "| gate/up (ranks 251/251)"]
    for r in rows:
        each, one = float(r[3]), float(r[4])
        assert each > 0 and one > 0 and float(r[5].rstrip(" |")) == pytest.approx(one / each, abs=0.01)
