"""SoCo ablations and "any ratio from one run", on the bundled default model.

    python benchmarks/soco_ablation.py            # all rows; --resume skips finished ones

Every row trains SoCo with the --quick preset (60 steps of 2×256 tokens) at ratio 0.4 and
changes one thing: a stage off (its steps go to the stage before it, or after it for
stage 1), the deviation bias d off, or the plain basis instead of the whitened one. The full
quick run is then cut at other ratios without retraining (`export_from_run`). Perplexity:
the first 24 held-out windows of 512 tokens (BoolQ dev passages, BOS prepended).
Writes benchmarks/results/soco_ablation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import soco_llm
from soco_llm.soco import QUICK, SoCoConfig

OUT = Path(__file__).parent / "results"
RATIO = 0.4


def variants() -> dict[str, dict]:
    s1, s2, s3 = SoCoConfig(ratio=RATIO, **QUICK).stages()
    return {
        "full (whitened, 3 stages, d)": {},
        "stage 1 off": {"stage_steps": [0, s1 + s2, s3]},
        "stage 2 off": {"stage_steps": [s1 + s2, 0, s3]},
        "stage 3 off": {"stage_steps": [s1, s2 + s3, 0]},
        "deviation d off": {"deviation": False},
        "plain basis": {"basis": "plain"},
    }


def atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run_variant(settings: dict, run_dir: Path | None) -> dict:
    model, tok = soco_llm.load_model()
    cfg = SoCoConfig(ratio=RATIO, **{**QUICK, **settings}, run_dir=str(run_dir) if run_dir else None)
    calib = soco_llm.calibration_windows(tok, "bundled", cfg.num_samples, cfg.seq_len, cfg.seed)
    start = time.perf_counter()
    report = soco_llm.compress(model, cfg, calib)
    seconds = time.perf_counter() - start
    ppl = soco_llm.evaluate_perplexity(model, tok)
    ranks = [r["rank"] for r in report.layers]
    return {"perplexity": ppl.perplexity, "tokens": ppl.tokens, "achieved": report.achieved_ratio,
            "seconds": seconds, "rank_min": min(ranks), "rank_max": max(ranks),
            "final_kl": report.config["final_train"]["kl"]}


def render(results: dict) -> str:
    lines = ["# SoCo ablations (default model, ratio 0.4, --quick preset)", "",
             f"Command: `{results['command']}`  ", f"Date: {results['date']}; torch {torch.__version__}, "
             f"{results['threads']} threads, {platform.processor() or platform.machine()}; load average at start "
             f"{results['load']} (a shared machine: times are indicative).", "",
             "Each row: 60 steps of 2×256 tokens; perplexity on the first 24 held-out windows of 512 tokens.",
             "Ratio = 1 − new/old over decoder-block linears (embeddings, LM head excluded), d counted.", "",
             "| variant | perplexity | achieved ratio | ranks | final KL | train (s) |", "|---|---:|---:|---|---:|---:|"]
    for name, r in results["variants"].items():
        lines.append(f"| {name} | {r['perplexity']:.1f} | {r['achieved']:.4f} | {r['rank_min']}–{r['rank_max']} | "
                     f"{r['final_kl']:.3f} | {r['seconds']:.0f} |")
    if results.get("export"):
        lines += ["", "## One run, other ratios", "",
                  "The full quick run (trained for 0.4) cut at other ratios by `soco export`, no retraining:", "",
                  "| ratio | perplexity | achieved |", "|---:|---:|---:|"]
        for ratio, r in sorted(results["export"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {float(ratio):.2f} | {r['perplexity']:.1f} | {r['achieved']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--export-ratios", nargs="*", type=float, default=[0.2, 0.3, 0.5, 0.6])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "soco_ablation.json"
    results = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    results.update(command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%d"), threads=args.threads,
                   load=[round(x, 1) for x in os.getloadavg()])
    results.setdefault("variants", {})
    results.setdefault("export", {})
    work = Path(tempfile.mkdtemp(prefix="soco-ablation-"))
    full_run = work / "full.run"
    for name, settings in variants().items():
        if name in results["variants"] and not (name.startswith("full") and args.export_ratios):
            continue
        run_dir = full_run if name.startswith("full") else None
        results["variants"][name] = run_variant(settings, run_dir)
        atomic_json(path, results)
    for ratio in args.export_ratios:
        model, tok, report = soco_llm.export_from_run(full_run, ratio)
        ppl = soco_llm.evaluate_perplexity(model, tok)
        results["export"][str(ratio)] = {"perplexity": ppl.perplexity, "achieved": report.achieved_ratio}
        atomic_json(path, results)
    md = render(results)
    (OUT / "soco_ablation.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
