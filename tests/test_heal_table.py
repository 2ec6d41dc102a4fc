"""benchmarks/heal_table.py end to end on a tiny model: one fresh `soco compress` per method and ratio gives
both rows (with and without healing) on two texts, with held-out KL, times and peak RSS; --resume skips them."""

import json

from test_report import load_script

heal_table = load_script("heal_table")


def test_heal_table_rows_from_one_command_each(model_dir, text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(text_file.read_text().split())))
    argv = ["--methods", "svd-llm", "soco", "--ratios", "0.4", "--heal-steps", "2", "--heal-lr", "1e-3",
            "--eval-data", str(text_file), str(other), "--eval-windows", "2", "--model", str(model_dir),
            "--calib", str(text_file), "--out-dir", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
            "--extra", "all:--eval-seq-len 32", "svd-llm:--samples 4 --seq-len 32",
            "soco:--set steps=3 num_samples=6 seq_len=32"]
    heal_table.main(argv)
    results = json.loads((tmp_path / "out" / "heal_table.json").read_text())
    assert set(results["rows"]) == {"svd-llm@0.4", "soco@0.4"}
    for row in results["rows"].values():
        assert row["peak_rss_mib"] > 50 and row["wall_s"] > 0 and row["heal"]["steps"] == 2
        assert row["eval"]["before_heal"][str(other)]["kl"] > 0
    md = (tmp_path / "out" / "heal_table.md").read_text()
    for name in ("| dense |", "| svd-llm |", "**svd-llm + heal**", "| soco |", "**soco + heal**"):
        assert name in md
    assert not any((tmp_path / "work").glob("*-0.4"))  # model folders deleted without --keep
    heal_table.main(argv + ["--resume"])  # nothing left to run
    assert json.loads((tmp_path / "out" / "heal_table.json").read_text())["rows"] == results["rows"]
