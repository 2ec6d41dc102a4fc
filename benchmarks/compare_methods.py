"""Quality benchmark: every compression method at every ratio, on the bundled default model.

    python benchmarks/compare_methods.py --ratios 0.2 0.4 0.6 --methods svd fwsvd asvd svd-llm --sequential

The parent process loads the dense model once, scores its perplexity on the held-out passages
and cuts the calibration windows (shared by every row; a trained method such as SoCo draws its
own num_samples × seq_len windows from the same passages and seed). Each method x ratio then runs in a
fresh child process (this script with --single): reload the dense model from the safetensors
cache, compress, score. Fresh processes keep the rows independent and make peak RSS a
per-row figure. Each finished row is checkpointed atomically into <out-dir>/compare_methods.json,
so `--resume` continues an interrupted run. Outputs: compare_methods.{json,md,png}.

Rows are named methods from `soco_llm.methods.base.METHODS`, so any method registered there (e.g.
`soco`) runs through the same `config_for` / `compress` calls; `--set METHOD.FIELD=VALUE`
passes method settings, `--methods soco soco-plain=soco --set soco-plain.basis=plain` adds a
second, labelled row of one method, `--plugin MODULE` imports a module that registers more methods.

SoCo side by side with the baselines (issue 3's benchmark; see benchmarks/README.md):

    python benchmarks/compare_methods.py --methods svd-llm asvd soco soco-plain=soco \
        --set soco-plain.basis='"plain"' --ratios 0.2 0.4 0.6 --size-row '' --out-dir benchmarks/results/soco
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, however it is loaded
from harness import rows as runner  # noqa: E402
from harness.environment import RESULTS, environment, repo_relative  # noqa: E402
from harness.plots import pyplot, save_png  # noqa: E402
from harness.rss import PeakRSS, mib, reset_peak_rss, rss_bytes, ru_maxrss_bytes, vm_hwm_bytes  # noqa: E402
from harness.sizes import decoder_linear_inventory, decoder_linear_params, saved_size  # noqa: E402
from harness.tables import fmt_ppl, perplexity_table  # noqa: E402

log = logging.getLogger("compare_methods")

STEM = "compare_methods"
RESULTS_VERSION = 1


# --------------------------------------------------------------------------- rows

@dataclass
class RowSpec:
    """One line of the comparison: a display label, a registered method name and its settings."""

    label: str
    method: str
    settings: dict = field(default_factory=dict)

    def key(self, ratio: float) -> str:
        return f"{self.label}@{ratio:g}"


def parse_settings(items: list[str]) -> dict[str, dict]:
    """`--set svd-llm.jitter=1e-5 --set soco.steps=150` -> {"svd-llm": {"jitter": 1e-5}, "soco": {"steps": 150}}."""
    out: dict[str, dict] = {}
    for item in items or []:
        lhs, sep, value = item.partition("=")
        method, dot, name = lhs.rpartition(".")
        if not sep or not dot or not method or not name:
            raise SystemExit(f"--set expects METHOD.FIELD=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


def ensure_method(method: str) -> None:
    """Make `method` known to config_for: it may live in a module that registers itself on import."""
    from soco_llm.methods.base import METHODS

    if method in METHODS:
        return
    for mod in (f"soco_llm.{method.replace('-', '_')}", f"soco_llm.methods.{method.replace('-', '_')}"):
        try:
            importlib.import_module(mod)
        except ImportError:
            continue
        if method in METHODS:
            return


def build_rows(methods: list[str], sequential: bool, settings: dict[str, dict]) -> list[RowSpec]:
    from soco_llm.methods.base import METHODS

    rows = []
    for item in methods:
        label, _, m = item.rpartition("=")  # "soco-plain=soco": a second row of one method, own --set
        label = label or m
        ensure_method(m)
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; registered: {', '.join(sorted(METHODS))} "
                             "(use --plugin MODULE for a method registered elsewhere)")
        rows.append(RowSpec(label, m, dict(settings.get(label, {}))))
    if sequential:
        rows.append(RowSpec("svd-llm (seq)", "svd-llm", {**settings.get("svd-llm", {}), "sequential": True}))
    return rows


def rows_to_run(finished: dict[str, dict], specs: list[RowSpec], ratios: list[float]
                ) -> list[tuple[int, RowSpec, float]]:
    """(order, spec, ratio) of each row not finished yet. Finished rows keep their place in the
    tables (their "order"); this invocation's new rows come after every one of them."""
    first = 1 + max((row["order"] for row in finished.values()), default=-1)
    jobs = [(spec, r) for spec in specs for r in ratios]
    return [(first + i, spec, r) for i, (spec, r) in enumerate(jobs) if spec.key(r) not in finished]


def tensor_digest(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- child: one row

def run_single(job: dict) -> dict:
    """Child process (`--single JOB.json`): one method x ratio, returned as its row."""
    t_start = time.perf_counter()
    for mod in job.get("plugins", []):
        importlib.import_module(mod)

    import torch
    from safetensors.torch import load_file

    import soco_llm

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    ensure_method(job["method"])
    config = soco_llm.config_for(job["method"], ratio=job["ratio"], **job["settings"])
    if job.get("save_dir") and getattr(config, "run_dir", "unset") is None:
        # a trained method keeps its run too (checkpoints, scores: `soco export` cuts it at other ratios)
        config.run_dir, config.resume = str(Path(job["save_dir"]) / f"{job['key']}.run"), True
    calib = load_file(job["calib_path"])["windows"]  # safetensors: no pickle between processes
    c = job["calibration"]
    calib_cfg = config.calibration(c["source"], c["seed"], num_samples=c["num_samples"], seq_len=c["seq_len"],
                                   batch_size=c["batch_size"])

    t0 = time.perf_counter()
    device = torch.device(job.get("device") or "cpu")
    model, tok = soco_llm.load_model(None, None, str(device))
    load_s = time.perf_counter() - t0
    if (calib_cfg.num_samples, calib_cfg.seq_len) != (c["num_samples"], c["seq_len"]):
        # a trained method (SoCo) samples windows of its own size, from the same passages and seed
        calib = soco_llm.calibration_windows(tok, c["source"], num_samples=calib_cfg.num_samples,
                                             seq_len=calib_cfg.seq_len, seed=c["seed"])
    inventory = decoder_linear_inventory(model)
    rss_before = rss_bytes()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hwm_reset = reset_peak_rss()  # so the kernel's high-water mark covers compression alone
    with PeakRSS(interval=0.01) as sampler:  # 10 ms, as the JSON says ("peak_rss_source")
        t0 = time.perf_counter()
        report = soco_llm.compress(model, config, calib, calib_cfg, soco_llm.HealConfig())  # the method alone
        compress_s = time.perf_counter() - t0
    hwm = vm_hwm_bytes() if hwm_reset else None
    peak_through_compress = ru_maxrss_bytes()  # process lifetime so far: model load + compression
    old, new = decoder_linear_params(model, inventory)

    e = job["eval"]
    t0 = time.perf_counter()
    ppl = soco_llm.evaluate_perplexity(model, tok, e["source"], e["seq_len"], e["windows"] or None, e["batch_size"])
    eval_s = time.perf_counter() - t0

    row = {
        "key": job["key"],
        "label": job["label"],
        "method": job["method"],
        "settings": job["settings"],
        "config": {**config.to_dict(), **({"run_dir": repo_relative(config.run_dir)} if getattr(config, "run_dir", None) else {})},
        "calibration": {"num_samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
        "target_ratio": job["ratio"],
        "achieved_ratio": 1.0 - new / old,
        "report_achieved_ratio": report.achieved_ratio,
        "decoder_linear_params_dense": old,
        "decoder_linear_params_compressed": new,
        "layers_left_dense": sum(1 for r in report.layers if r["rank"] == 0),
        "layers": len(report.layers),
        "model_params_before": report.model_params_before,
        "model_params_after": report.model_params_after,
        "perplexity": ppl.perplexity,
        "nll": ppl.nll,
        "tokens": ppl.tokens,
        "eval_windows": ppl.windows,
        "compress_s": round(compress_s, 2),
        "load_s": round(load_s, 2),
        "eval_s": round(eval_s, 2),
        "rss_before_compress_mib": mib(rss_before),
        # Peak RSS of compress() alone: the kernel's VmHWM reset just before it (Linux), else the sampled peak.
        "peak_rss_mib": mib(hwm if hwm is not None else sampler.peak),
        "peak_rss_source": "VmHWM reset before compress()" if hwm is not None else "psutil sampling every 10 ms",
        "peak_rss_compress_sampled_mib": mib(sampler.peak),
        "peak_rss_since_start_mib": mib(peak_through_compress),
        "peak_rss_incl_eval_mib": mib(ru_maxrss_bytes()),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        **({"peak_gpu_mib": mib(torch.cuda.max_memory_allocated(device))} if device.type == "cuda" else {}),
        "ranks": {"min": min((r["rank"] for r in report.layers if r["rank"]), default=0),
                  "max": max((r["rank"] for r in report.layers), default=0)},
    }
    if job.get("measure_size"):
        row["saved_size"] = saved_size(model, tok, report, list(inventory))
    if job.get("save_dir"):  # keep the compressed model, e.g. for benchmarks/zeroshot.py --models
        row["saved_to"] = repo_relative(soco_llm.save_compressed(model, tok, Path(job["save_dir"]) / job["key"], report,
                                                              overwrite=True))
    row["child_s"] = round(time.perf_counter() - t_start, 2)
    return row


# --------------------------------------------------------------------------- parent

def render_markdown(results: dict) -> str:
    from soco_llm.core.budget import RATIO_DEFINITION

    rows = results["rows"]
    gpu = any("peak_gpu_mib" in r for r in rows.values())  # the column only where a row ran on CUDA
    env = results["environment"]
    s = results["settings"]
    dense = results.get("dense") or {}
    lines = [
        "# Compression methods compared on the bundled default model",
        "",
        f"Model: {s['model']}. Perplexity on the held-out BoolQ dev passages ({s['eval']['source']}): "
        f"first {s['eval']['windows']} non-overlapping windows of {s['eval']['seq_len']} tokens "
        f"(BOS prepended and not scored), {dense.get('tokens', '?')} scored tokens. Calibration: "
        f"{s['calibration']['num_samples']} windows of {s['calibration']['seq_len']} tokens from "
        f"`{s['calibration']['source']}` (seed {s['calibration']['seed']}), the same windows for every method. "
        "Uniform ranks r = ⌊m·n·(1−ratio)/(m+n)⌋.",
        "",
        f"**Ratio**: {RATIO_DEFINITION}. A ratio of 0.4 removes 40 % of the decoder-linear parameters.",
        "",
        f"Dense perplexity: **{fmt_ppl(dense.get('perplexity'))}**.",
        "",
        "## Perplexity (lower is better)",
        "",
        *perplexity_table(results),
        "## Cost and achieved size",
        "",
        "Each row runs in its own fresh process. *compress (s)*: wall time of `compress()` "
        "(statistics + decompositions; not model load or evaluation). *peak RSS*: the process's "
        "resident-memory high-water mark during `compress()` alone (Linux VmHWM, reset just before "
        "the call), which includes the dense fp32 model already loaded (*before*) and the runtime. "
        "*achieved*: recounted from the compressed modules, by the definition above.",
        "",
        "| method | target | achieved | perplexity | tokens | compress (s) | peak RSS (MiB) |"
        + (" peak GPU (MiB) |" if gpu else "") + " before (MiB) | ranks | model params |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "") + "---:|---|---:|",
    ]
    for row in sorted(rows.values(), key=lambda r: (r["order"], r["target_ratio"])):
        gpu_cell = (f" | {row['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in row else " | —") if gpu else ""
        lines.append(
            f"| {row['label']} | {row['target_ratio']:g} | {row['achieved_ratio']:.4f} | {fmt_ppl(row['perplexity'])} "
            f"| {row['tokens']} | {row['compress_s']:.1f} | {row['peak_rss_mib']:.0f}{gpu_cell} "
            f"| {row['rss_before_compress_mib']:.0f} | {row['ranks']['min']}–{row['ranks']['max']} "
            f"| {row['model_params_after'] / 1e6:.2f}M |")
    sized = [r for r in rows.values() if r.get("saved_size")]
    if sized:
        lines += ["", "## Saved size", ""]
        for row in sized:
            z = row["saved_size"]
            lines.append(
                f"- {row['label']} at {row['target_ratio']:g}, saved with `save_compressed` (fp32 safetensors): "
                f"decoder-linear tensors {mib(z['decoder_linear_bytes_compressed'])} MiB vs dense "
                f"{mib(z['decoder_linear_bytes_dense'])} MiB = **{100 * z['decoder_linear_fraction']:.1f} %**; "
                f"whole weights file {mib(z['file_bytes_compressed'])} MiB vs {mib(z['file_bytes_dense'])} MiB "
                f"({100 * z['file_fraction']:.1f} %; embeddings are tied and not compressed).")
    # results written before the shared harness recorded `cpu_count` and a three-value load average
    cores = env.get("logical_cpus", env.get("cpu_count"))
    load = env.get("load_average_1min", (env.get("load_average_at_start") or [None])[0])
    lines += [
        "",
        "## Environment",
        "",
        f"- command: `{env['command']}`",
        *[f"- resumed from an earlier run ({e.get('date')}): `{e.get('command')}`" for e in env.get("earlier_runs", [])],
        f"- date: {env['date']}; git commit {env.get('git_commit')}",
        f"- torch {env['torch']}, transformers {env['transformers']}, python {env['python']}",
        f"- CPU: {env['cpu']}, {cores} cores, torch threads {env['torch_threads']}; "
        f"1-min load average at start {load} (the machine is shared: times are indicative)",
        "",
        "![perplexity vs ratio](compare_methods.png)",
        "",
    ]
    return "\n".join(lines)


def render_plot(results: dict, path: Path) -> None:
    rows = sorted(results["rows"].values(), key=lambda r: (r["order"], r["target_ratio"]))
    fig, ax = pyplot().subplots(figsize=(8.5, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = [(r["target_ratio"], r["perplexity"]) for r in rows if r["label"] == label]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    dense = (results.get("dense") or {}).get("perplexity")
    if dense:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (fraction of decoder-linear parameters removed)")
    ax.set_ylabel("perplexity, held-out BoolQ passages (log)")
    ax.set_title(f"{results['settings']['model']}: perplexity vs ratio")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)  # outside: lines never hidden
    save_png(fig, path, dpi=120)


def print_table(results: dict) -> None:
    rows = results["rows"]
    ratios = sorted({r["target_ratio"] for r in rows.values()})
    labels = list(dict.fromkeys(r["label"] for r in sorted(rows.values(), key=lambda r: r["order"])))
    dense = (results.get("dense") or {}).get("perplexity")
    w = max([len(x) for x in labels] + [6])
    print(f"{'method':<{w}}  " + "  ".join(f"{r:>10g}" for r in ratios) + "   (perplexity; dense "
          f"{fmt_ppl(dense)})")
    for label in labels:
        cells = [rows.get(f"{label}@{r:g}") for r in ratios]
        print(f"{label:<{w}}  " + "  ".join(f"{fmt_ppl(c['perplexity']) if c else '—':>10}" for c in cells))


def write_outputs(results: dict, out_dir: Path) -> None:
    from soco_llm.io.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out_dir / f"{STEM}.json", results)
    if results["rows"]:
        atomic_write_text(out_dir / f"{STEM}.md", render_markdown(results))
        render_plot(results, out_dir / f"{STEM}.png")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else [sys.argv[0], *argv]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["svd", "fwsvd", "asvd", "svd-llm"],
                   help="registered method names (soco_llm.methods.base.METHODS), or LABEL=METHOD for another row of a "
                        "method with its own --set LABEL.FIELD=VALUE; default: svd fwsvd asvd svd-llm")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--calib", default="bundled", help="calibration text source (default bundled)")
    p.add_argument("--eval-data", default="bundled", help="held-out text source (default bundled)")
    p.add_argument("--eval-windows", type=int, default=24, help="held-out windows scored (default 24)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--sequential", action="store_true", help="add the row 'svd-llm (seq)': SVD-LLM, sequential=True")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="a row setting, e.g. --set asvd.alpha=1.0 (JSON value; METHOD is the row's label); repeatable")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it may register more methods); repeatable")
    p.add_argument("--size-row", default="svd-llm@0.4",
                   help="LABEL@RATIO of the row whose saved size is measured ('' for none; default svd-llm@0.4)")
    p.add_argument("--save-models", type=Path, default=None, metavar="DIR",
                   help="also save every compressed model to DIR/LABEL@RATIO (replacing an earlier one)")
    p.add_argument("--jobs", type=int, default=1,
                   help="rows run at once, each in its own process (default 1; more share the CPU, so times are "
                        "only comparable within one setting)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    p.add_argument("--device", default="cpu", help="where each row runs: cpu, cuda or cuda:N (peak GPU memory is "
                   "recorded beside peak RSS on CUDA)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true", help="skip rows already in <out-dir>/compare_methods.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars from the child processes")
    p.add_argument("--single", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv[1:])

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("soco_llm").setLevel(logging.WARNING)
    if args.single:
        runner.child(args.single, run_single)
        return 0

    for mod in args.plugin:
        importlib.import_module(mod)
    from safetensors.torch import save_file

    import soco_llm
    from soco_llm.models import DEFAULT_MODEL

    for r in args.ratios:
        if not 0 < r < 1:
            raise SystemExit(f"ratios must be in (0, 1); got {r}")
    rows_spec = build_rows(args.methods, args.sequential, parse_settings(args.settings))
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / f"{STEM}.json"

    t0 = time.perf_counter()
    model, tok = soco_llm.load_model()
    log.info("loaded %s in %.1fs", DEFAULT_MODEL, time.perf_counter() - t0)
    calib = soco_llm.calibration_windows(tok, args.calib, num_samples=args.samples, seq_len=args.seq_len,
                                         seed=args.seed)
    settings = {
        "model": DEFAULT_MODEL,
        "calibration": {"source": args.calib, "num_samples": int(calib.shape[0]), "seq_len": args.seq_len,
                        "seed": args.seed, "batch_size": args.batch_size, "sha256_16": tensor_digest(calib)},
        "eval": {"source": args.eval_data, "seq_len": args.eval_seq_len, "windows": args.eval_windows,
                 "batch_size": args.eval_batch_size},
    }
    fresh = {"version": RESULTS_VERSION, "settings": settings, "environment": environment(__file__, argv[1:]),
             "dense": None, "rows": {}}
    results = runner.start(results_path, fresh, args.resume, "compare_methods.py", carry=("dense",))

    if results["dense"] is None:
        t0 = time.perf_counter()
        ppl = soco_llm.evaluate_perplexity(model, tok, args.eval_data, args.eval_seq_len, args.eval_windows or None,
                                           args.eval_batch_size)
        results["dense"] = {**ppl.to_dict(), "eval_s": round(time.perf_counter() - t0, 2)}
        log.info("dense        %s", ppl)
        write_outputs(results, out_dir)
    del model  # children load their own copy from the safetensors cache

    todo = {spec.key(r): (order, spec, r) for order, spec, r in rows_to_run(results["rows"], rows_spec, args.ratios)}
    with tempfile.TemporaryDirectory(prefix="compare-methods-") as work:
        work = Path(work)
        calib_path = work / "calib.safetensors"
        save_file({"windows": calib.contiguous()}, str(calib_path))

        def run(key: str, todo_item: tuple[int, RowSpec, float]) -> dict:
            _, spec, r = todo_item
            job = {"key": key, "label": spec.label, "method": spec.method, "settings": spec.settings, "ratio": r,
                   "calib_path": str(calib_path), "calibration": settings["calibration"],
                   "eval": settings["eval"], "threads": args.threads, "device": args.device, "plugins": args.plugin,
                   "measure_size": key == args.size_row,
                   "save_dir": str(args.save_models.resolve()) if args.save_models else None}
            return runner.run_fresh(__file__, "--single", key, job, work, args.quiet)

        def done(key: str, todo_item: tuple[int, RowSpec, float], row: dict) -> None:
            order, spec, r = todo_item
            row["order"], row["parallel_jobs"] = order, args.jobs
            results["rows"][key] = row
            log.info("%-14s ratio %.2f (achieved %.4f): perplexity %s, compress %.1fs, peak RSS %.0f MiB",
                     spec.label, r, row["achieved_ratio"], fmt_ppl(row["perplexity"]), row["compress_s"],
                     row["peak_rss_mib"])
            write_outputs(results, out_dir)  # checkpoint: an interrupted run resumes from here

        # Rows are independent processes; --jobs N runs N at once (their times then share the CPU).
        failures = runner.run_rows(todo, run, done, parallel=max(args.jobs, 1))
    write_outputs(results, out_dir)
    print_table(results)
    if failures:
        print(f"failed rows (re-run with --resume to retry): {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
