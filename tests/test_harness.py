"""benchmarks/harness: resume and row running (in and out of process), the environment record, RSS, tables."""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))  # the harness, as the scripts import it
from harness import rows  # noqa: E402
from harness.environment import REPO, command_line, environment, repo_relative  # noqa: E402
from harness.rss import PeakRSS, reset_peak_rss, rss_bytes, vm_hwm_bytes  # noqa: E402
from harness.tables import acc_cell, chances, fmt_ppl, perplexity_table  # noqa: E402


def fresh(settings=None):
    return {"settings": settings or {"n": 1}, "environment": {"date": "new", "command": "python new"}, "rows": {}}


def test_start_without_resume_or_file_is_the_fresh_run(tmp_path):
    new = fresh()
    assert rows.start(tmp_path / "r.json", new, resume=False, prog="x.py") is new
    assert rows.start(tmp_path / "missing.json", new, resume=True, prog="x.py") is new


def test_start_resumes_finished_rows_and_records_the_earlier_run(tmp_path):
    path = tmp_path / "r.json"
    old = {**fresh(), "dense": {"perplexity": 20.0},
           "environment": {"date": "d1", "command": "python old", "git_commit": "abc", "cpu": "not kept",
                           "earlier_runs": [{"date": "d0"}]},
           "rows": {"a@0.4": {"order": 0}, "b@0.4": {"order": 1, "error": "boom"}}}
    path.write_text(json.dumps(old))
    res = rows.start(path, fresh(), resume=True, prog="x.py", carry=("dense",))
    assert list(res["rows"]) == ["a@0.4"]  # a row that recorded an error runs again
    assert res["dense"] == {"perplexity": 20.0} and res["environment"]["command"] == "python new"
    assert res["environment"]["earlier_runs"] == [{"date": "d0"}, {"date": "d1", "command": "python old",
                                                                   "git_commit": "abc"}]


def test_start_reads_the_nested_history_of_older_files(tmp_path):
    path = tmp_path / "r.json"
    env = {"date": "d2", "resumed_from": {"date": "d1", "resumed_from": {"date": "d0"}}}
    path.write_text(json.dumps({**fresh(), "environment": env}))
    res = rows.start(path, fresh(), resume=True, prog="x.py")
    assert [e["date"] for e in res["environment"]["earlier_runs"]] == ["d0", "d1", "d2"]


def test_start_refuses_a_file_made_with_other_settings(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(fresh({"n": 2})))
    with pytest.raises(SystemExit, match="x.py: error: .* was made with other settings"):
        rows.start(path, fresh({"n": 1}), resume=True, prog="x.py")


@pytest.mark.parametrize("parallel", [1, 3])
def test_run_rows_hands_back_rows_skips_and_collects_failures(parallel):
    done = {}

    def run(key, job):
        if job == "fail":
            raise rows.RowFailed("child exited with 1")
        return None if job == "skip" else {"value": job}

    failures = rows.run_rows({"a": 1, "b": "fail", "c": "skip", "d": 4}, run,
                             lambda key, job, row: done.setdefault(key, row), parallel=parallel)
    assert failures == ["b"] and done == {"a": {"value": 1}, "d": {"value": 4}}
    with pytest.raises(ValueError):  # anything but the failures named in `errors` stops the run
        rows.run_rows({"a": 1}, lambda key, job: int("x"), lambda *a: None)
    assert rows.run_rows({"a": 1}, lambda key, job: int("x"), lambda *a: None, errors=(ValueError,)) == ["a"]


def test_run_fresh_runs_a_row_in_a_child_process(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(BENCH)!r})
        from harness import rows

        def run(job):
            if job["fail"]:
                print("it went wrong", file=sys.stderr)
                sys.exit(3)
            return {{"pid": os.getpid(), "double": 2 * job["x"], "quiet": os.environ.get("TQDM_DISABLE")}}

        rows.child(sys.argv[2], run)
    """))
    row = rows.run_fresh(script, "--row", "k@0.4", {"x": 21, "fail": False}, tmp_path, quiet=True)
    assert row["double"] == 42 and row["pid"] != os.getpid() and row["quiet"] == "1" and row["process_wall_s"] > 0
    assert rows.run_fresh(script, "--row", "k2", {"x": 1, "fail": False}, tmp_path)["quiet"] is None
    with pytest.raises(rows.RowFailed, match="child exited with 3: it went wrong"):
        rows.run_fresh(script, "--row", "bad", {"x": 1, "fail": True}, tmp_path, quiet=True)


def test_environment_names_the_command_to_repeat_the_run(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    script = BENCH / "speed.py"
    assert command_line(script, ["--ratios", "0.4", "a b"]) == "python benchmarks/speed.py --ratios 0.4 'a b'"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert command_line(script, []) == "OMP_NUM_THREADS=1 python benchmarks/speed.py"
    assert repo_relative(REPO / "runs" / "x") == "runs/x" and repo_relative("/somewhere/else/run") == "run"
    env = environment(script, ["--x"], threads_requested=2)
    assert env["command"] == "OMP_NUM_THREADS=1 python benchmarks/speed.py --x" and env["threads_requested"] == 2
    for key in ("date", "git_commit", "cpu", "usable_cpus", "torch", "torch_threads", "python", "device"):
        assert key in env


def test_peak_rss_sees_an_allocation():
    with PeakRSS(interval=0.001) as peak:
        block = bytearray(64 * 2**20)
        block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page, so it is resident
        before_free = rss_bytes()
        time.sleep(0.05)  # let the sampling thread see it (the GIL was held while touching the pages)
        del block
    assert peak.peak >= before_free
    if reset_peak_rss():  # Linux: the kernel's high-water mark restarts from the current RSS
        assert vm_hwm_bytes() is not None and vm_hwm_bytes() >= rss_bytes() // 2


def test_tables_formats():
    assert [fmt_ppl(x) for x in (None, 20.61, 315.3, 4567.0, 1.98e7)] == ["—", "20.6", "315.3", "4567", "1.98e+07"]
    assert acc_cell({"acc": 0.6, "acc_stderr": 0.028}) == "0.600 ± 0.028" and acc_cell({"acc": 0.6}) == "0.600"
    assert acc_cell(None) == "—" and acc_cell({"acc": 0.6}, "acc_norm") == "—"
    assert chances(["soco_piqa", "custom", "openbookqa"]) == "soco_piqa 0.5, openbookqa 0.25"
    results = {"dense": {"perplexity": 20.6},
               "rows": {"b@0.4": {"label": "b", "target_ratio": 0.4, "perplexity": 30.0, "order": 1},
                        "a@0.2": {"label": "a", "target_ratio": 0.2, "perplexity": 25.0, "order": 0}}}
    assert perplexity_table(results) == ["| method | 0.2 | 0.4 |", "|---|---:|---:|", "| a | 25 | — |",
                                         "| b | — | 30 |", ""]
    assert perplexity_table(results, with_dense=True)[2] == "| dense | 20.6 | 20.6 |"
