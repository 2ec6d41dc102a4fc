"""SoCo on the bundled default model: main rows, ablations, and other ratios from one run.

    python benchmarks/soco_bench.py                        # everything below; --resume skips finished rows
    python benchmarks/soco_bench.py --full-ratios 0.4 --quick-ratios 0.2 0.6 --no-ablation

Rows (each in a fresh subprocess, so wall time and peak RSS are its own):
  soco @ r          the default SoCoConfig (160 steps of 4×256 tokens), `soco compress --method soco`
  soco quick @ r    the --quick preset (60 steps of 2×256 tokens)
  ablations @ 0.4   --quick with one change: a stage off (its steps go to a neighbour), the
                    deviation bias d off, or the plain basis instead of the whitened one
  export @ r        a finished run (--export-from, default the quick 0.4 run) cut at r without retraining
Perplexity: the first 24 held-out windows of 512 tokens (BoolQ dev passages, BOS prepended),
as in benchmarks/compare_methods.py. Writes benchmarks/results/soco_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, however it is loaded
from harness import rows as runner  # noqa: E402
from harness.environment import RESULTS, command_line, environment  # noqa: E402
from harness.rss import MiB, ru_maxrss_bytes  # noqa: E402

ABLATION_RATIO = 0.4


def ablations(quick: dict) -> dict[str, dict]:
    from soco_llm.methods.soco.config import SoCoConfig

    s1, s2, s3 = SoCoConfig(ratio=ABLATION_RATIO, **quick).stages()
    return {"stage 1 off": {"stage_steps": [0, s1 + s2, s3]}, "stage 2 off": {"stage_steps": [s1 + s2, 0, s3]},
            "stage 3 off": {"stage_steps": [s1, s2 + s3, 0]}, "straight-through off": {"straight_through": "off"},
            "deviation d off": {"deviation": False},
            "plain basis": {"basis": "plain"}}


def run_row(spec: dict) -> dict:
    """One row, in this (child) process (`--row JOB.json`)."""
    import torch

    import soco_llm
    from soco_llm.methods.soco.config import SoCoConfig

    torch.set_num_threads(spec["threads"])
    if spec.get("export_from"):
        start = time.perf_counter()
        model, tok, report = soco_llm.export_from_run(spec["export_from"], spec["ratio"])
    else:
        model, tok = soco_llm.load_model()
        cfg = SoCoConfig(ratio=spec["ratio"], **spec["settings"])
        calib = soco_llm.calibration_windows(tok, "bundled", cfg.num_samples, cfg.seq_len, cfg.seed)
        start = time.perf_counter()
        report = soco_llm.compress(model, cfg, calib, heal_config=soco_llm.HealConfig())  # training alone
    seconds = time.perf_counter() - start
    ppl = soco_llm.evaluate_perplexity(model, tok)
    ranks = [r["rank"] for r in report.layers]
    final = report.config.get("final_train") or {}
    return {"ratio": spec["ratio"], "perplexity": ppl.perplexity, "tokens": ppl.tokens,
            "achieved": report.achieved_ratio, "seconds": seconds, "rank_min": min(ranks), "rank_max": max(ranks),
            "final_kl": final.get("kl"), "settings": spec.get("settings", {}),
            "peak_rss_mib": ru_maxrss_bytes() / MiB}


def render(res: dict) -> str:
    env = res["environment"]
    threads = env.get("threads_requested", env.get("threads"))  # files from before the harness: "threads", "load"
    load = env.get("load_average_1min", env.get("load"))
    lines = ["# SoCo on the default model", "",
             f"Command: `{res['command']}`  ", f"{env['date']}; torch {env['torch']}, transformers {env['transformers']}, "
             f"{env['cpu']}, {threads} torch threads; load average at start {load} "
             "(a shared machine: times are indicative).", "",
             "Perplexity on the first 24 held-out windows of 512 tokens (BoolQ dev passages, BOS prepended).",
             "Ratio = 1 − new/old over decoder-block linears (embeddings and LM head excluded); SoCo's bias d "
             "counts m per compressed layer.", "",
             "| row | ratio | perplexity | achieved | ranks | final KL | time (s) | peak RSS (MiB) |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, r in res["rows"].items():
        kl = f"{r['final_kl']:.3f}" if r.get("final_kl") is not None else ""
        rss = f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") is not None else "not measured"
        lines.append(f"| {name} | {r['ratio']:.2f} | {r['perplexity']:.1f} | {r['achieved']:.4f} | "
                     f"{r['rank_min']}–{r['rank_max']} | {kl} | {r['seconds']:.0f} | {rss} |")
    notes = [f"- {name}: {r['note']}" for name, r in res["rows"].items() if r.get("note")]
    if notes:
        lines += ["", *notes]
    lines += ["", "Rows: `soco` = default SoCoConfig (160 steps of 4×256 tokens); `quick` = --quick preset "
              "(60 steps of 2×256); ablations are quick runs at 0.4 with one change; `export` rows cut a "
              "finished run (see its note) at another ratio without retraining. `time` is compress() (teacher cache, basis, training, "
              "cut) or the export, not model loading or evaluation."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full-ratios", nargs="*", type=float, default=[0.4])
    ap.add_argument("--quick-ratios", nargs="*", type=float, default=[0.2, 0.4, 0.6])
    ap.add_argument("--no-ablation", dest="ablation", action="store_false")
    ap.add_argument("--export-ratios", nargs="*", type=float, default=[0.2, 0.3, 0.5, 0.6])
    ap.add_argument("--export-from", type=Path, default=None, metavar="RUN",
                    help="cut this finished run for the export rows (default: the quick 0.4 run made here), e.g. "
                         "a run kept by compare_methods.py --save-models")
    ap.add_argument("--only", nargs="*", default=None, metavar="ROW",
                    help="run only the rows with these names (e.g. 'plain basis @ 0.4'); default: all planned rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json")
    ap.add_argument("--row", type=Path, help=argparse.SUPPRESS)  # internal: run one row in this process
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    if args.row:
        runner.child(args.row, run_row)
        return 0
    from soco_llm.io.atomic import atomic_write_json, atomic_write_text
    from soco_llm.methods.soco.config import SoCoConfig

    quick = SoCoConfig.presets["quick"]
    path, md = args.out_dir / "soco_bench.json", args.out_dir / "soco_bench.md"
    if args.render_only:
        atomic_write_text(md, render(json.loads(path.read_text())))
        return 0
    fresh = {"rows": {}, "command": command_line(__file__, sys.argv[1:]),
             "environment": environment(__file__, sys.argv[1:], threads_requested=args.threads)}
    res = runner.start(path, fresh, args.resume, "soco_bench.py")
    work = Path(tempfile.mkdtemp(prefix="soco-bench-"))
    quick_run = work / "quick-0.4.run"
    plan: list[tuple[str, dict]] = [(f"soco @ {r}", {"ratio": r, "settings": {}}) for r in args.full_ratios]
    for r in args.quick_ratios:
        settings = dict(quick, run_dir=str(quick_run)) if r == ABLATION_RATIO else dict(quick)
        plan.append((f"soco quick @ {r}", {"ratio": r, "settings": settings}))
    if args.ablation:
        plan += [(f"{name} @ {ABLATION_RATIO}", {"ratio": ABLATION_RATIO, "settings": {**quick, **s}})
                 for name, s in ablations(quick).items()]
    source = args.export_from or quick_run
    plan += [(f"export @ {r}", {"ratio": r, "export_from": str(source)}) for r in args.export_ratios]
    if args.only is not None:
        plan = [(name, spec) for name, spec in plan if name in args.only]

    def run(name: str, spec: dict) -> dict | None:
        # decided row by row: the quick 0.4 run that export rows cut exists only once its row has run
        needs_quick_run = (spec.get("export_from") and not args.export_from) or spec.get("settings", {}).get("run_dir")
        if name in res["rows"] and not (needs_quick_run and not quick_run.exists()):
            return None
        if spec.get("export_from") and not Path(spec["export_from"]).exists():
            logging.warning("skipping %s: needs the quick 0.4 run (add 0.4 to --quick-ratios)", name)
            return None
        logging.info("row %s", name)
        return runner.run_fresh(__file__, "--row", name, {**spec, "threads": args.threads}, work)

    def done(name: str, spec: dict, row: dict) -> None:
        row["settings"].pop("run_dir", None)
        if spec.get("export_from"):
            row["note"] = f"cut from the run `{Path(spec['export_from']).name}` without retraining"
        res["rows"][name] = row
        args.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, res)
        atomic_write_text(md, render(res))

    runner.run_rows(dict(plan), run, done)  # a failed row is logged and left out; --resume retries it
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
