"""Zero-shot accuracy (lm-eval) of the dense default model and compressed models, in one run.

    python benchmarks/zeroshot.py --methods svd fwsvd asvd svd-llm --ratios 0.2 0.4 0.6 \\
        --models "soco@0.4=runs/soco-0.4" "soco@0.2=runs/soco-0.2" --tasks soco_piqa soco_openbookqa --limit 300
    python benchmarks/zeroshot.py ... --resume        # skip the models already in zeroshot.json

The dense default model is loaded and scored first. Each baseline (method x ratio) reloads the
dense model from the safetensors cache and compresses it in place with `config_for(method,
ratio=r)`, using one set of calibration windows, `calibration_windows(tok, "bundled", 32, 512,
0)` as in compare_methods.py, cut once when the first method needs them. `--models LABEL@RATIO=DIR`
adds saved compressed folders, e.g. SoCo outputs. Every model is scored with
`soco_llm.eval.zeroshot.evaluate_tasks` on the same tasks and the same first `--limit` documents.
After each model, <out-dir>/zeroshot.json is rewritten atomically (the checkpoint `--resume` reads);
zeroshot.md (tables) and zeroshot_vs_ratio.png (accuracy vs ratio) are written at the end.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, however it is loaded
from harness import rows as runner  # noqa: E402
from harness.environment import RESULTS, environment, package_version  # noqa: E402
from harness.plots import pyplot, save_png  # noqa: E402
from harness.tables import acc_cell, chance, chances  # noqa: E402

log = logging.getLogger("zeroshot")

STEM = "zeroshot"
RESULTS_VERSION = 1


def parse_model_spec(text: str) -> tuple[str, float, str]:
    """'soco@0.4=runs/soco-0.4' -> ('soco', 0.4, 'runs/soco-0.4')."""
    head, eq, folder = text.partition("=")
    label, at, ratio = head.rpartition("@")
    try:
        value = float(ratio)
    except ValueError:
        value = -1.0
    if not eq or not at or not label or not folder or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--models expects LABEL@RATIO=DIR with RATIO in (0, 1), got {text!r}")
    return label, value, folder


def plan(args) -> list[dict]:
    """Every model to score, in order: dense, the baselines, then the saved folders."""
    jobs = [{"key": "dense", "label": "dense", "method": "dense", "ratio": 0.0}]
    jobs += [{"key": f"{m}@{r:g}", "label": m, "method": m, "ratio": r} for m in args.methods for r in args.ratios]
    for label, ratio, folder in args.models:
        jobs.append({"key": f"{label}@{ratio:g}", "label": label, "method": None, "ratio": ratio, "path": folder})
    keys = [j["key"] for j in jobs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise SystemExit(f"zeroshot.py: error: model(s) named twice: {', '.join(dupes)}")
    return jobs


def score(model, tok, tasks: list[str], limit: int | None, batch_size: int, manager=None) -> dict:
    """Zero-shot accuracy of one loaded model: {tasks: {task: {acc, acc_stderr, acc_norm, ...}}, seconds}."""
    from soco_llm.eval.zeroshot import evaluate_tasks, summary

    t0 = time.perf_counter()
    results = evaluate_tasks(model, tok, tasks, limit=limit, batch_size=batch_size, manager=manager)
    return {"tasks": summary(results), "eval_s": round(time.perf_counter() - t0, 2)}


def build_model(job: dict, load, calibration, calib_settings: dict) -> tuple[object, object, dict]:
    """(model, tokenizer, facts) for one job: dense, compressed here, or a saved folder."""
    import soco_llm
    from soco_llm.io import read_compression

    if job.get("path"):
        comp = read_compression(job["path"])
        model, tok = load(job["path"])
        return model, tok, {"method": comp.get("method"), "achieved_ratio": comp.get("achieved_ratio"),
                            "path": job["path"]}
    model, tok = load(None)
    if job["method"] == "dense":
        return model, tok, {"achieved_ratio": 0.0}
    cfg = soco_llm.config_for(job["method"], ratio=job["ratio"])
    calib = calibration(tok) if (cfg.needs or cfg.sequential) else None
    report = soco_llm.compress(model, cfg, calib, soco_llm.CalibrationConfig(**calib_settings))
    return model, tok, {"achieved_ratio": report.achieved_ratio, "compress_s": round(report.seconds, 2)}


def run(args, argv: list[str], load=None) -> dict:
    """Score every planned model, checkpointing <out-dir>/zeroshot.json after each; returns the results."""
    import torch

    import soco_llm
    from soco_llm.eval.zeroshot import check_options, task_manager
    from soco_llm.io import read_compression
    from soco_llm.io.atomic import atomic_write_json
    from soco_llm.models import DEFAULT_MODEL

    torch.set_num_threads(args.threads)
    check_options(args.limit, 0)
    manager = task_manager(args.tasks)  # unknown task names fail here, before any model is loaded
    jobs = plan(args)
    for job in jobs:  # and so do missing or non-compressed --models folders
        if job.get("path"):
            read_compression(job["path"])
    load = load or (lambda spec: soco_llm.load_model(spec))
    settings = {"model": DEFAULT_MODEL, "tasks": list(args.tasks), "limit": args.limit, "num_fewshot": 0,
                "batch_size": args.batch_size,
                "calibration": {"source": "bundled", "num_samples": args.samples, "seq_len": args.seq_len, "seed": 0,
                                "batch_size": 8}}
    path = args.out_dir / f"{STEM}.json"
    env = environment(__file__, argv[1:], lm_eval=package_version("lm_eval"), threads_requested=args.threads)
    fresh = {"version": RESULTS_VERSION, "settings": settings, "environment": env, "rows": {}}
    results = runner.start(path, fresh, args.resume, "zeroshot.py")
    args.out_dir.mkdir(parents=True, exist_ok=True)

    cache = {}

    def calibration(tok):
        if "calib" not in cache:
            cache["calib"] = soco_llm.calibration_windows(tok, "bundled", args.samples, args.seq_len, 0)
        return cache["calib"]

    todo = {}
    for order, job in enumerate(jobs):
        if job["key"] in results["rows"]:  # finished earlier: it keeps its place in this run's order
            results["rows"][job["key"]]["order"] = order
        else:
            todo[job["key"]] = {**job, "order": order}

    def run_one(key: str, job: dict) -> dict:
        log.info("%s: loading%s", key, "" if job["method"] in (None, "dense") else " and compressing")
        t0 = time.perf_counter()
        model, tok, facts = build_model(job, load, calibration, settings["calibration"])
        row = {**{k: v for k, v in job.items() if k not in ("path", "order")}, **facts,
               **score(model, tok, args.tasks, args.limit, args.batch_size, manager)}
        row.update(order=job["order"], seconds=round(time.perf_counter() - t0, 2))
        del model, tok
        gc.collect()  # free this model before the next one is loaded
        return row

    def done(key: str, job: dict, row: dict) -> None:
        results["rows"][key] = row
        log.info("%s: %s (%.0fs)", key, ", ".join(f"{t} acc {v.get('acc', float('nan')):.3f}"
                                                    for t, v in row["tasks"].items()), row["seconds"])
        atomic_write_json(path, results)  # checkpoint; tables and plot at the end

    results["failures"] = runner.run_rows(todo, run_one, done, errors=(soco_llm.SocoError,))
    write_outputs(results, args.out_dir)
    return results


# --------------------------------------------------------------------------- rendering

def ordered_rows(results: dict) -> list[dict]:
    return sorted(results["rows"].values(), key=lambda r: (r.get("order", 1e9), r.get("ratio", 0)))


def render_markdown(results: dict) -> str:
    s, env = results["settings"], results["environment"]
    tasks = s["tasks"]
    n = {t: next((r["tasks"][t].get("n") for r in ordered_rows(results) if r["tasks"].get(t, {}).get("n")), None)
         for t in tasks}
    head = "| model | method | ratio | achieved | " + " | ".join(f"{t} (n={n[t]})" for t in tasks) + " | seconds |"
    lines = ["# Zero-shot accuracy, dense vs compressed", "",
             f"Model: {s['model']}. lm-eval, {s['num_fewshot']}-shot, the first "
             f"{s['limit'] if s['limit'] else 'all'} documents of each task, batch size {s['batch_size']}. "
             "Cells: accuracy ± its standard error (acc_norm in the second table). "
             f"Baselines calibrated on {s['calibration']['num_samples']} bundled windows of "
             f"{s['calibration']['seq_len']} tokens (seed {s['calibration']['seed']}).", ""]
    for key, title in (("acc", "Accuracy"), ("acc_norm", "Length-normalised accuracy (acc_norm)")):
        lines += [f"## {title}", "", head, "|---|---|---:|---:|" + "---:|" * len(tasks) + "---:|"]
        for r in ordered_rows(results):
            ach = r.get("achieved_ratio")
            lines.append(f"| {r['label']} | {r.get('method') or '—'} | {r['ratio']:g} | "
                         f"{'—' if ach is None else f'{ach:.3f}'} | "
                         + " | ".join(acc_cell(r["tasks"].get(t), key) for t in tasks) + f" | {r.get('seconds', 0):.0f} |")
        lines.append("")
    lines += [f"Chance accuracy: {chances(tasks) or 'see the task'} "
              "(PIQA and BoolQ have 2 answers, 0.5; OpenBookQA has 4, 0.25).", "",
              "## Environment", "",
              f"- command: `{env['command']}`",
              f"- date: {env['date']}; git commit {env.get('git_commit')}; --limit {s['limit']}",
              f"- torch {env.get('torch')}, transformers {env.get('transformers')}, lm-eval {env.get('lm_eval')}, "
              f"python {env.get('python')}",
              f"- CPU: {env.get('cpu')}, {env.get('usable_cpus')} usable CPUs, "
              f"torch threads {env.get('torch_threads')}; "
              f"1-min load average at start {env.get('load_average_1min')} (a shared machine: times are indicative)",
              "", "![accuracy vs ratio](zeroshot_vs_ratio.png)", ""]
    return "\n".join(lines)


def render_plot(results: dict, path: Path) -> None:
    tasks = results["settings"]["tasks"]
    rows = ordered_rows(results)
    fig, axes = pyplot().subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label in dict.fromkeys(r["label"] for r in rows if r["label"] != "dense"):
            pts = sorted((r["ratio"], r["tasks"][task]["acc"], r["tasks"][task].get("acc_stderr", 0.0)) for r in rows
                         if r["label"] == label and "acc" in r["tasks"].get(task, {}))
            if pts:
                x, y, err = zip(*pts)
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        dense = results["rows"].get("dense", {}).get("tasks", {}).get(task, {}).get("acc")
        if dense is not None:
            ax.axhline(dense, color="black", linewidth=1.2, label=f"dense ({dense:.3f})")
        if chance(task) is not None:
            ax.axhline(chance(task), color="grey", linestyle="--", linewidth=1, label=f"chance ({chance(task):g})")
        ax.set_title(task)
        ax.set_xlabel("compression ratio (decoder-linear parameters removed)")
        ax.set_ylabel("accuracy (bars: ± stderr)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    limit = results["settings"]["limit"]
    fig.suptitle(f"{results['settings']['model']}: zero-shot accuracy vs ratio"
                 + (f" (first {limit} documents per task)" if limit else ""))
    save_png(fig, path, dpi=110)


def write_outputs(results: dict, out_dir: Path) -> None:
    from soco_llm.io.atomic import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / f"{STEM}.json", results)
    if results["rows"]:
        atomic_write_text(out_dir / f"{STEM}.md", render_markdown(results))
        render_plot(results, out_dir / f"{STEM}_vs_ratio.png")


def print_table(results: dict) -> None:
    tasks = results["settings"]["tasks"]
    rows = ordered_rows(results)
    w = max([len(r["key"]) for r in rows] + [5])
    print(f"{'model':<{w}}  " + "  ".join(f"{t:>15}" for t in tasks) + "   (acc ± stderr)")
    for r in rows:
        print(f"{r['key']:<{w}}  " + "  ".join(f"{acc_cell(r['tasks'].get(t)):>15}" for t in tasks))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=["svd", "fwsvd", "asvd", "svd-llm"],
                   help="baselines compressed here (default: svd fwsvd asvd svd-llm)")
    p.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--models", nargs="*", type=parse_model_spec, default=[], metavar="LABEL@RATIO=DIR",
                   help="saved compressed folders, e.g. soco@0.4=runs/soco-0.4")
    p.add_argument("--tasks", nargs="+", default=["soco_piqa", "soco_openbookqa"])
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="lm-eval batch size (default 4)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true", help="skip models already in <out-dir>/zeroshot.json")
    return p


def main(argv: list[str] | None = None, load=None) -> int:
    """`load(spec)` -> (model, tokenizer) replaces soco_llm.load_model (tests pass tiny models)."""
    argv = sys.argv if argv is None else [sys.argv[0], *argv]
    args = build_parser().parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("soco_llm").setLevel(logging.WARNING)
    for r in args.ratios:
        if not 0 < r < 1:
            raise SystemExit(f"zeroshot.py: error: ratios must be in (0, 1); got {r}")
    from soco_llm.errors import SocoError
    from soco_llm.methods.base import METHODS

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"zeroshot.py: error: unknown method(s) {', '.join(unknown)}; registered: "
                         f"{', '.join(sorted(METHODS))} (saved folders go in --models)")
    try:
        results = run(args, argv, load)
    except SocoError as e:
        print(f"zeroshot.py: error: {e}", file=sys.stderr)
        return 2
    print_table(results)
    if results["failures"]:
        print(f"failed models (re-run with --resume to retry): {', '.join(results['failures'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
