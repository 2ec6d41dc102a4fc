"""Healing side by side: dense, SVD-LLM, SVD-LLM + healing, SoCo, SoCo + healing at each ratio, on two kinds
of held-out text, with the held-out KL beside the training KL, wall time and peak memory.

    python benchmarks/heal_table.py --ratios 0.2 0.4 0.6 --heal-steps 60 --out-dir benchmarks/results/heal

Each method x ratio is one `soco compress --method M --ratio R --heal-steps N --eval-data bundled pubmed`
in a fresh process. That one command evaluates the dense model (keeping its top-k log-probs on the
held-out windows), the cut model before healing and after, on both texts, and measures each model's
held-out KL to the dense model in the same passes. So a method's rows with and without healing come
from one run on the same windows, and every method heals against the same teacher (the dense model's
top-128 log-probs on SoCo's default 256 training windows of the calibration passages, never the
held-out ones) for the same steps at the same learning rate. Nothing trains on either held-out text.

Times: "compress" is the method's own time (the report's seconds), "heal" the healing's; the process's
wall time and peak RSS (the whole command, three evaluations and the teacher included) are the healed
row's (with `--jobs 2`, rows share the machine: their times are indicative). Each finished row is
checkpointed into <out-dir>/heal_table.json; `--resume` continues, and may add other ratios or methods.
The model folders go to --work-dir (not committed) and are deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file
from harness import rows as runner  # noqa: E402
from harness.environment import RESULTS, environment  # noqa: E402
from harness.outputs import emit  # noqa: E402
from harness.rss import mib  # noqa: E402

STEM = "heal_table"
TEXT_NAMES = {"bundled": "BoolQ dev", "pubmed": "PubMedQA"}


def soco_command(method: str, ratio: float, args, out: Path) -> list[str]:
    cmd = ["soco", "compress", "--method", method, "--ratio", f"{ratio:g}", "--out", str(out), "--overwrite",
           "--heal-steps", str(args.heal_steps), "--heal-batch-size", str(args.heal_batch_size),
           "--eval-data", *args.eval_data, "--eval-windows", str(args.eval_windows)]
    if args.heal_lr is not None:
        cmd += ["--heal-lr", f"{args.heal_lr:g}"]
    if args.heal_schedule is not None:
        cmd += ["--heal-schedule", args.heal_schedule]
    if method == "soco" and args.quick:
        cmd.append("--quick")
    for option in ("model", "calib"):
        if getattr(args, option):
            cmd += [f"--{option}", getattr(args, option)]
    for spec in args.extra:
        who, _, options = spec.partition(":")
        if who in ("all", method):
            cmd += shlex.split(options)
    return cmd


def run_row(key: str, job: dict, work: Path, keep: bool) -> dict:
    """Run one command in a fresh process; its row is what the saved folder's report records."""
    out = work / key.replace("@", "-")
    for stale in (out.with_name(out.name + ".run"), out.with_name(out.name + ".heal")):
        shutil.rmtree(stale, ignore_errors=True)  # a row runs from the start; --resume skips finished rows
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if job.get("threads"):  # torch reads it at start-up: the child's intra-op threads
        env["OMP_NUM_THREADS"] = str(job["threads"])
    log_path = work / f"{out.name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(job["command"], env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so the rusage is this child's alone
    wall = time.perf_counter() - start
    output = log_path.read_text().strip().splitlines()
    if os.waitstatus_to_exitcode(status) != 0:
        raise runner.RowFailed(f"exit {os.waitstatus_to_exitcode(status)}: {' | '.join(output[-3:])}")
    comp = json.loads((out / "config.json").read_text())["compression"]
    cfg = comp["config"]
    row = {"method": job["method"], "ratio": job["ratio"], "command": " ".join(job["command"]),
           "threads": job.get("threads"), "jobs": job.get("jobs", 1),
           "achieved_ratio": comp["achieved_ratio"], "eval": cfg["eval"], "heal": cfg["heal"],
           "final_train": cfg.get("final_train"), "phases": cfg.get("phases"),
           "compress_s": json.loads((out / "compression_report.json").read_text())["seconds"],
           "wall_s": round(wall, 1), "output_tail": [line for line in output if "it/s]" not in line][-8:],
           "peak_rss_mib": round(mib(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)), 1)}
    if not keep:
        for path in (out, out.with_name(out.name + ".run"), out.with_name(out.name + ".heal")):
            shutil.rmtree(path, ignore_errors=True)
    return row


def _cell(x: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(results: dict) -> str:
    s = results["settings"]
    texts = s["eval_data"]
    env = results["environment"]
    lines = [f"# Healing after the cut, side by side ({'SoCo --quick' if s['quick'] else 'SoCo default'})", "",
             f"{env['cpu']}, {env['usable_cpus']} usable CPUs, torch {env['torch']}. Commands (rows of a later "
             "one are added to the earlier ones', same settings): "
             + "; then ".join(f"`{r['command']}` ({r['date'][:16]} UTC, commit {(r.get('git_commit') or '?')[:10]})"
                              for r in [*env.get("earlier_runs", []), env])
             + "".join(f" Note on the run of {r['date'][:16]} UTC: {r['note']}."
                       for r in [*env.get("earlier_runs", []), env] if r.get("note")), "",
             f"Perplexity on the first {s['eval_windows']} held-out windows of 512 tokens of each text: "
             + ", ".join(f"{TEXT_NAMES.get(t, t)} (`--eval-data {t}`)" for t in texts)
             + ". Held-out KL: mean per-token KL(dense ‖ model) on those windows of each text (the dense model's top-128 "
               "log-probs + one bucket for the rest), measured in the perplexity pass. Training "
               f"KL: SoCo's last training step; healing's mean over its first / last 10 steps (one 4x256 batch each). "
               f"Healing: {s['heal_steps']} steps of {s['heal_batch_size']}x256 tokens, Adam at the row's learning "
               "rate and schedule (`heal lr`), for every method against the same teacher on the same windows."
             + (f" More options: {', '.join(f'`{e}`' for e in s['extra'])}." if s.get("extra") else ""), ""]
    head = ["ratio", "model"] + [f"ppl {TEXT_NAMES.get(t, t)}" for t in texts] + \
        [f"held-out KL {TEXT_NAMES.get(t, t)}" for t in texts] + ["train KL", "heal lr", "compress", "heal", "wall", "peak RSS"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    rows = sorted(results["rows"].values(), key=lambda r: (r["ratio"], r["method"] != "svd-llm"))
    if rows:
        dense = rows[0]["eval"]["dense"]
        lines.append("| — | dense | " + " | ".join(_cell(dense[t]["perplexity"]) for t in texts) + " | "
                     + " | ".join("0" for _ in texts) + " | — | — | — | — | — | — |")
    for r in rows:
        heal, ev = r["heal"], r["eval"]
        train_before = r["final_train"]["kl"] if r.get("final_train") else None
        heal_lr = f"{heal['lr']:g}" + (f" {heal['schedule']}" if heal.get("schedule", "constant") != "constant" else "")
        for stage, name, train, lr, heal_s, wall, rss in (
                ("before_heal", r["method"], train_before if train_before is not None else heal["kl_first_10"],
                 "—", None, None, None),
                ("compressed", f"**{r['method']} + heal**", heal["kl_last_10"], heal_lr, heal["seconds"],
                 r["wall_s"], r["peak_rss_mib"])):
            cells = [f"{r['ratio']:g}", name] + [_cell(ev[stage][t]["perplexity"]) for t in texts] + \
                [_cell(ev[stage][t]["kl"], "{:.3f}") for t in texts] + \
                [_cell(train, "{:.3f}"), lr, f"{r['compress_s']:.0f} s", _cell(heal_s, "{:.0f} s"),
                 _cell(wall and wall / 60, "{:.1f} min"), _cell(rss and rss / 1024, "{:.2f} GiB")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Train KL of an unhealed SVD-LLM row: healing's first 10 steps (before they have moved much); "
              "of an unhealed SoCo row: SoCo's own last step. Wall and peak RSS: the whole command, both rows."]
    shared = [r for r in rows if r.get("jobs", 1) > 1 or r.get("threads")]
    if shared:
        lines.append(f"Run {shared[0].get('jobs', 1)} at a time with {shared[0].get('threads') or 'default'} torch "
                     "thread(s) each, so their times are not comparable with the rows run alone: "
                     + ", ".join(f"{r['method']} @ {r['ratio']:g}" for r in shared) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["svd-llm", "soco"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--heal-steps", type=int, default=60)
    p.add_argument("--heal-lr", type=float, default=None, help="default: each method's own (soco compress's)")
    p.add_argument("--heal-schedule", choices=["constant", "cosine"], default=None,
                   help="default: each method's own (soco compress's)")
    p.add_argument("--heal-batch-size", type=int, default=4)
    p.add_argument("--eval-data", nargs="+", default=["bundled", "pubmed"])
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--quick", action="store_true", help="SoCo rows with --quick (a smoke run, not the table)")
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--calib", default=None, help="calibration text (default: bundled)")
    p.add_argument("--extra", nargs="+", default=[], metavar="METHOD:OPTIONS",
                   help="more `soco compress` options for one method's rows (all: every row), e.g. "
                        "'soco:--set steps=300'")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--work-dir", type=Path, default=Path("runs") / STEM)
    p.add_argument("--keep", action="store_true", help="keep the model folders in --work-dir")
    p.add_argument("--jobs", type=int, default=1, help="rows run at once (each its own process)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per row (OMP_NUM_THREADS; default: "
                   "torch's own)")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    # Methods and ratios are not settings: a later --resume run may add rows of others to the same table.
    settings = {k: getattr(args, k) for k in ("heal_steps", "heal_lr", "heal_schedule", "heal_batch_size",
                                              "eval_data", "eval_windows", "quick", "model", "calib", "extra")}
    path = args.out_dir / f"{STEM}.json"
    results = runner.start(path, {"settings": settings, "environment": environment(__file__, argv), "rows": {}},
                           args.resume, "heal_table.py")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    jobs = {f"{m}@{r:g}": {"method": m, "ratio": r, "threads": args.threads, "jobs": args.jobs,
                           "command": soco_command(m, r, args, args.work_dir / f"{m}-{r:g}")}
            for r in args.ratios for m in args.methods}
    jobs = {k: j for k, j in jobs.items() if k not in results["rows"]}

    def done(key: str, job: dict, row: dict) -> None:
        results["rows"][key] = row
        emit(markdown(results), args.out_dir / f"{STEM}.md", path, results)

    failed = runner.run_rows(jobs, lambda k, j: run_row(k, j, args.work_dir, args.keep), done, parallel=args.jobs)
    if not jobs and results["rows"]:  # --resume with nothing left to run renders the table again
        emit(markdown(results), args.out_dir / f"{STEM}.md", path, results)
    if failed:
        raise SystemExit(f"heal_table.py: rows failed: {', '.join(failed)}; rerun with --resume")


if __name__ == "__main__":
    main()
