"""benchmarks/report.py and benchmarks/zeroshot.py on small fixtures and a tiny random model; no network."""

import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
import torch

from tiny import tiny_model, tiny_tokenizer

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


report = load_script("report")
zeroshot = load_script("zeroshot")

ENV = {"date": "2026-01-02T03:04:05+00:00", "command": "python benchmarks/x.py --flag", "torch": "2.0", "transformers":
       "5.0", "python": "3.11", "cpu": "Test CPU", "cpu_count": 2, "torch_threads": 2, "lm_eval": "0.4.13"}


def acc(a, n=300):
    return {"acc": a, "acc_stderr": 0.028, "acc_norm": a - 0.01, "acc_norm_stderr": 0.028, "n": n}


def zeroshot_results():
    rows = {"dense": {"key": "dense", "label": "dense", "method": "dense", "ratio": 0.0, "achieved_ratio": 0.0,
                      "tasks": {"soco_piqa": acc(0.612), "soco_openbookqa": acc(0.31)}, "seconds": 100, "order": 0}}
    for order, (label, ratio, a) in enumerate([("svd", 0.2, 0.52), ("svd", 0.4, 0.5), ("soco", 0.4, 0.58)], 1):
        rows[f"{label}@{ratio:g}"] = {"key": f"{label}@{ratio:g}", "label": label, "method": label, "ratio": ratio,
                                      "achieved_ratio": ratio + 0.001, "seconds": 90, "order": order,
                                      "tasks": {"soco_piqa": acc(a), "soco_openbookqa": acc(0.26)}}
    return {"version": 1, "environment": ENV, "rows": rows, "failures": [],
            "settings": {"model": "Tiny", "tasks": ["soco_piqa", "soco_openbookqa"], "limit": 300, "num_fewshot": 0,
                         "batch_size": 4, "calibration": {"num_samples": 32, "seq_len": 512, "seed": 0}}}


def write_fixtures(d: Path) -> None:
    def ppl_row(label, ratio, ppl, order):
        return {"label": label, "target_ratio": ratio, "achieved_ratio": ratio + 0.001, "perplexity": ppl,
                "order": order}

    compare = {"version": 1, "environment": ENV, "dense": {"perplexity": 20.6, "tokens": 12264},
               "settings": {"model": "Tiny", "eval": {"source": "bundled", "windows": 24, "seq_len": 512},
                            "calibration": {"source": "bundled", "num_samples": 32, "seq_len": 512, "seed": 0}},
               "rows": {"svd@0.4": ppl_row("svd", 0.4, 1.98e7, 0), "svd-llm@0.4": ppl_row("svd-llm", 0.4, 315.3, 1),
                        "soco (quick)@0.4": ppl_row("soco (quick)", 0.4, 61.25, 2)}}
    speed_row = {"prefill_tok_s": {"128": 211.0}, "prefill_speedup": {"128": 1.0}, "decode_tok_s": 10.1,
                 "decode_speedup": 1.0, "decode_speedup_cpu": 1.0, "decode_limit": 1.0, "weight_bytes": 538060032,
                 "peak_mib": 614.8}
    speed = {"hardware": {"cpu": "Test CPU", "usable_cpus": 2, "torch_threads": 1, "torch": "2.0"},
             "settings": {"prefill_lengths": [128], "decode_prompt": 128, "new_tokens": 64, "warmup": 1,
                          "repeats": 5, "device": "cpu"},
             "results": [{**speed_row, "label": "dense", "achieved_ratio": 0.0},
                         {**speed_row, "label": "svd 0.4", "achieved_ratio": 0.401, "prefill_tok_s": {"128": 286.0},
                          "prefill_speedup": {"128": 1.35}, "decode_limit": 1.46, "weight_bytes": 367633152}]}
    soco = {"command": "python benchmarks/soco_bench.py", "rows": {}}
    (d / "heal").mkdir()
    (d / "heal" / "heal_table.json").write_text(json.dumps({"settings": {}, "rows": {}}))
    (d / "heal" / "heal_table.md").write_text("# Healing\n\n| ratio | model |\n|---|---|\n| 0.4 | **soco + heal** |\n")
    (d / "soco_bench.md").write_text("# SoCo on the default model\n\n| row | ratio |\n|---|---:|\n| stage 2 off @ 0.4 | 0.40 |\n")
    for name, obj in [("compare_methods.json", compare), ("zeroshot.json", zeroshot_results()),
                      ("speed_cpu.json", speed), ("soco_bench.json", soco)]:
        (d / name).write_text(json.dumps(obj))
    (d / "compare_methods.png").write_bytes(b"\x89PNG")
    (d / "decode_profile_cpu.md").write_text("| ms per decoded token | dense | svd 0.4 | dense / svd 0.4 |\n"
                                              "|---|---:|---:|---:|\n| attention | 1.50 | 1.50 | 1.00 |\n")


def test_report_renders_every_section(tmp_path):
    results, out = tmp_path / "results", tmp_path / "docs" / "RESULTS.md"
    results.mkdir()
    write_fixtures(results)
    assert report.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "embeddings and LM head excluded" in text  # the ratio definition
    assert "| dense | 20.6 |" in text and "| soco (quick) | 61.2 |" in text and "| svd | 1.98e+07 |" in text
    assert "| soco | 0.401 | 0.580 ± 0.028 | 0.260 ± 0.028 |" in text and "| svd | 0.201 |" not in text
    assert "| svd 0.4 | 0.401 | 286 (1.35) | 10.1 (1.00) | 1.00 | 1.46 | 350.6 | 615 |" in text
    assert "| stage 2 off @ 0.4 | 0.40 |" in text and "# SoCo on the default model" not in text
    assert "![perplexity vs ratio](../results/compare_methods.png)" in text
    assert "zeroshot_vs_ratio.png" not in text  # not produced in this fixture: no broken link
    assert "`python benchmarks/x.py --flag`" in text and "lm_eval 0.4.13" in text and "2026-01-02T03:04:05" in text
    assert "### Where a decode step's time goes (ratio 0.4)\n\n| ms per decoded token |" in text
    assert "| attention | 1.50 | 1.50 | 1.00 |" in text
    assert "## Healing after the cut" in text and "| 0.4 | **soco + heal** |" in text
    assert "Not measured yet" in text  # the layer crossover and 360M files are absent
    assert report.main(["--results", str(results), "--out", str(out), "--check"]) == 0
    (results / "soco_bench.json").unlink()
    assert report.main(["--results", str(results), "--out", str(out), "--check"]) == 1


def test_report_missing_inputs_say_what_to_run(tmp_path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    for script in ("compare_methods.py", "zeroshot.py", "speed.py", "soco_bench.py", "layer_crossover.py",
                   "decode_profile.py", "speed.py --model shape:smollm2-360m", "heal_table.py", "sibling_gemm.py"):
        assert "Not measured yet: run `" in text and f"benchmarks/{script}" in text
    assert report.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 1


def test_zeroshot_table_and_plot(tmp_path):
    results = zeroshot_results()
    zeroshot.write_outputs(results, tmp_path)
    md = (tmp_path / "zeroshot.md").read_text()
    assert "| dense | dense | 0 | 0.000 | 0.612 ± 0.028 | 0.310 ± 0.028 | 100 |" in md
    assert "soco_piqa (n=300)" in md and "acc_norm" in md and "soco_piqa 0.5, soco_openbookqa 0.25" in md
    assert "`python benchmarks/x.py --flag`" in md
    assert (tmp_path / "zeroshot_vs_ratio.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "zeroshot.json").read_text())["rows"].keys() == results["rows"].keys()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("SOCO_LLM_CACHE", str(tmp_path / "cache"))


def test_zeroshot_scores_tiny_models_and_resumes(tmp_path, offline, monkeypatch):
    pytest.importorskip("lm_eval")
    import soco_llm

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the recorded command would start with it
    torch.set_num_threads(1)
    saved = tmp_path / "tiny-svd"
    model, tok = tiny_model("llama"), tiny_tokenizer()
    soco_llm.save_compressed(model, tok, saved, soco_llm.compress(model, soco_llm.SVDConfig(ratio=0.5)))

    def load(spec):  # the dense "default" model is a tiny random Llama; saved folders load for real
        return (tiny_model("llama"), tiny_tokenizer()) if spec is None else soco_llm.load_model(spec)

    out = tmp_path / "out"
    argv = ["--methods", "svd", "--ratios", "0.4", "--models", f"tiny@0.5={saved}", "--tasks", "soco_piqa",
            "--limit", "2", "--threads", "1", "--out-dir", str(out)]
    assert zeroshot.main(argv, load=load) == 0
    data = json.loads((out / "zeroshot.json").read_text())
    assert list(data["rows"]) == ["dense", "svd@0.4", "tiny@0.5"]
    for row in data["rows"].values():
        piqa = row["tasks"]["soco_piqa"]
        assert piqa["n"] == 2 and 0 <= piqa["acc"] <= 1 and "acc_stderr" in piqa
    assert data["rows"]["tiny@0.5"]["method"] == "svd" and data["settings"]["limit"] == 2
    assert data["environment"]["command"].startswith("python benchmarks/zeroshot.py --methods svd")
    assert (out / "zeroshot.md").is_file() and (out / "zeroshot_vs_ratio.png").is_file()

    def no_load(spec):
        raise AssertionError("--resume should not reload finished models")

    assert zeroshot.main(argv + ["--resume"], load=no_load) == 0
    resumed = json.loads((out / "zeroshot.json").read_text())
    assert resumed["rows"] == data["rows"]
    assert resumed["environment"]["earlier_runs"][-1]["command"] == data["environment"]["command"]
    # the report says which run a resumed zeroshot.json continued
    lines = report.env_lines(resumed["environment"], show_resumed=True)
    assert f"- resumed a run started {data['environment']['date']}" in lines


def test_report_env_lines_say_a_resumed_run_for_old_and_new_files():
    old = {**ENV, "resumed_from": {"date": "2026-01-01T00:00:00+00:00"}}
    new = {**ENV, "earlier_runs": [{"date": "2025-12-31T00:00:00+00:00"}, {"date": "2026-01-01T00:00:00+00:00"}]}
    for env in (old, new):
        assert "- resumed a run started 2026-01-01T00:00:00+00:00" in report.env_lines(env, show_resumed=True)
        assert not any("resumed" in line for line in report.env_lines(env))


def test_soco_bench_table_from_old_and_new_environment_records():
    soco_bench = load_script("soco_bench")
    row = {"ratio": 0.4, "perplexity": 61.25, "achieved": 0.4001, "rank_min": 10, "rank_max": 300, "final_kl": 0.5,
           "seconds": 900, "peak_rss_mib": 2000, "note": "cut from the run `x.run` without retraining"}
    old_env = {"date": "2026-11-25 04:23 UTC", "torch": "2.0", "transformers": "5.0", "cpu": "x86_64", "threads": 1,
               "load": [3.2, 2.9, 2.5]}
    new_env = {**ENV, "threads_requested": 1, "load_average_1min": 3.2}
    for env, load in ((old_env, "[3.2, 2.9, 2.5]"), (new_env, "3.2")):
        text = soco_bench.render({"command": "python benchmarks/soco_bench.py", "environment": env,
                                  "rows": {"export @ 0.4": row}})
        assert f"1 torch threads; load average at start {load} " in text
        assert "| export @ 0.4 | 0.40 | 61.2 | 0.4001 | 10–300 | 0.500 | 900 | 2000 |" in text
        assert "- export @ 0.4: cut from the run `x.run` without retraining" in text


def test_compare_methods_rows_with_labels_and_settings():
    cm = load_script("compare_methods")
    settings = cm.parse_settings(["soco-plain.basis=plain", "soco.steps=40", "asvd.alpha=1.0"])
    rows = cm.build_rows(["asvd", "soco", "soco-plain=soco"], False, settings)
    assert [(r.label, r.method, r.settings) for r in rows] == [
        ("asvd", "asvd", {"alpha": 1.0}), ("soco", "soco", {"steps": 40}), ("soco-plain", "soco", {"basis": "plain"})]
    assert rows[2].key(0.4) == "soco-plain@0.4"
    with pytest.raises(SystemExit, match="unknown method"):
        cm.build_rows(["x=nope"], False, {})


def test_compare_methods_resume_appends_new_rows_after_finished_ones():
    cm = load_script("compare_methods")
    finished = {"svd@0.4": {"order": 0}, "soco@0.4": {"order": 5}}
    specs = [cm.RowSpec("soco", "soco"), cm.RowSpec("soco-plain", "soco", {"basis": "plain"})]
    todo = cm.rows_to_run(finished, specs, [0.2, 0.4])
    assert [(o, s.label, r) for o, s, r in todo] == [(6, "soco", 0.2), (8, "soco-plain", 0.2), (9, "soco-plain", 0.4)]
    assert finished["soco@0.4"]["order"] == 5  # a finished row keeps its place
    assert [o for o, _, _ in cm.rows_to_run({}, specs[:1], [0.4])] == [0]


def test_committed_results_page_is_up_to_date():
    """docs/RESULTS.md is what report.py makes of the committed results (run it after adding results)."""
    assert report.main(["--check"]) == 0
