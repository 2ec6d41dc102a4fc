"""Quality benchmark: every compression method at every ratio, on the bundled default model.

    python benchmarks/compare_methods.py --ratios 0.2 0.4 0.6 --methods svd fwsvd asvd svd-llm --sequential

The parent process loads the dense model once, scores its perplexity on the held-out passages
and cuts the calibration windows (shared by every row; a trained method such as SoCo draws its
own num_samples × seq_len windows from the same passages and seed). Each method x ratio then runs in a
fresh child process (this script with --single): reload the dense model from the safetensors
cache, compress, score. Fresh processes keep the rows independent and make peak RSS a
per-row figure. Each finished row is checkpointed atomically into <out-dir>/compare_methods.json,
so `--resume` continues an interrupted run. Outputs: compare_methods.{json,md,png}.

Rows are named methods from `soco_llm.config.METHODS`, so any method registered there (e.g.
`soco`) runs through the same `config_for` / `compress` calls; `--set METHOD.FIELD=VALUE`
passes method settings, `--methods soco soco-plain=soco --set soco-plain.basis=plain` adds a
second, labelled row of one method, `--plugin MODULE` imports a module that registers more methods.

SoCo side by side with the baselines (issue 3's benchmark; see benchmarks/README.md):

    python benchmarks/compare_methods.py --methods svd-llm asvd soco soco-plain=soco \
        --set soco-plain.basis='"plain"' --ratios 0.2 0.4 0.6 --size-row '' --out-dir benchmarks/results/soco
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("compare_methods")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
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
    from soco_llm.config import METHODS

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
    from soco_llm.config import METHODS

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


# --------------------------------------------------------------------------- helpers

def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def shown_path(p) -> str:
    """Repo-relative when inside the repo, so committed results name no machine-specific folder."""
    p = Path(p).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name


def mib(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; Linux only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_bytes() -> int | None:
    """The kernel's RSS high-water mark since the last reset_peak_rss() (or process start)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ru_maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


class RSSSampler:
    """Samples this process's RSS in a thread; `peak` is the highest value seen while running."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(argv: list[str]) -> dict:
    import torch
    import transformers

    import soco_llm

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join([os.path.relpath(argv[0], REPO) if os.path.isabs(argv[0]) else argv[0],
                                          *argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "soco_llm": soco_llm.__version__,
        "git_commit": commit,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
    }


def tensor_digest(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- child: one row

def decoder_linear_inventory(model) -> dict[str, tuple[int, int, bool]]:
    from soco_llm.adapter import find_targets

    return {t.name: (*t.shape, getattr(t.module, "bias", None) is not None) for t in find_targets(model)}


def decoder_linear_params(model, inventory: dict[str, tuple[int, int, bool]]) -> tuple[int, int]:
    """(old, new) decoder-linear parameter counts, counted independently of the compression report.

    A compressed layer costs its factors (r*(m+n)) plus any bias it did not have before (SoCo's d);
    a layer left dense costs m*n. Original biases are not counted, as in METHOD.md.
    """
    from soco_llm.layer import LowRankLinear

    old = new = 0
    for name, (m, n, had_bias) in inventory.items():
        module = model.get_submodule(name)
        old += m * n
        if isinstance(module, LowRankLinear):
            new += module.A.numel() + module.B.numel()
            if module.bias is not None and not had_bias:
                new += module.bias.numel()
        else:
            new += m * n
    return old, new


def decoder_linear_bytes(weights: Path, names: list[str]) -> int:
    """Bytes of the tensors under the given module names in a safetensors file."""
    from safetensors import safe_open

    prefixes = tuple(n + "." for n in names)
    total = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefixes):
                sl = f.get_slice(key)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                total += numel * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(sl.get_dtype(), 4)
    return total


def saved_size(model, tok, report, names: list[str]) -> dict:
    """Save the compressed model to a temp folder; compare its decoder-linear bytes with the dense copy's."""
    import soco_llm
    from soco_llm.models import default_model_dir

    dense_file = default_model_dir() / "model.safetensors"
    with tempfile.TemporaryDirectory(prefix="soco-bench-") as tmp:
        out = soco_llm.save_compressed(model, tok, Path(tmp) / "model", report)
        comp_file = out / "model.safetensors"
        comp_lin = decoder_linear_bytes(comp_file, names)
        comp_total = comp_file.stat().st_size
    dense_lin = decoder_linear_bytes(dense_file, names)
    dense_total = dense_file.stat().st_size
    return {
        "decoder_linear_bytes_compressed": comp_lin,
        "decoder_linear_bytes_dense": dense_lin,
        "decoder_linear_fraction": comp_lin / dense_lin,
        "file_bytes_compressed": comp_total,
        "file_bytes_dense": dense_total,
        "file_fraction": comp_total / dense_total,
    }


def run_single(job_path: Path) -> None:
    """Child process: one method x ratio. Reads the job JSON, writes the row JSON to job['result']."""
    t_start = time.perf_counter()
    job = json.loads(job_path.read_text())
    for mod in job.get("plugins", []):
        importlib.import_module(mod)

    import torch
    from safetensors.torch import load_file

    import soco_llm
    from soco_llm.config import CalibrationConfig

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    ensure_method(job["method"])
    config = soco_llm.config_for(job["method"], ratio=job["ratio"], **job["settings"])
    if job.get("save_dir") and getattr(config, "run_dir", "unset") is None:
        # a trained method keeps its run too (checkpoints, scores: `soco export` cuts it at other ratios)
        config.run_dir, config.resume = str(Path(job["save_dir"]) / f"{job['key']}.run"), True
    calib = load_file(job["calib_path"])["windows"]  # safetensors: no pickle between processes
    c = job["calibration"]
    calib_cfg = CalibrationConfig(c["source"], c["num_samples"], c["seq_len"], c["seed"], c["batch_size"])

    t0 = time.perf_counter()
    model, tok = soco_llm.load_model()
    load_s = time.perf_counter() - t0
    own = {k: getattr(config, k) for k in ("num_samples", "seq_len") if hasattr(config, k)}
    if own:  # a trained method (SoCo) samples its own windows, from the same passages and seed
        calib = soco_llm.calibration_windows(tok, c["source"], seed=c["seed"], **own)
    inventory = decoder_linear_inventory(model)
    rss_before = RSSSampler().proc.memory_info().rss

    hwm_reset = reset_peak_rss()  # so the kernel's high-water mark covers compression alone
    with RSSSampler() as sampler:
        t0 = time.perf_counter()
        report = soco_llm.compress(model, config, calib, calib_cfg)
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
        "config": {**config.to_dict(), **({"run_dir": shown_path(config.run_dir)} if getattr(config, "run_dir", None) else {})},
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
        "ranks": {"min": min((r["rank"] for r in report.layers if r["rank"]), default=0),
                  "max": max((r["rank"] for r in report.layers), default=0)},
    }
    if job.get("measure_size"):
        row["saved_size"] = saved_size(model, tok, report, list(inventory))
    if job.get("save_dir"):  # keep the compressed model, e.g. for benchmarks/zeroshot.py --models
        row["saved_to"] = shown_path(soco_llm.save_compressed(model, tok, Path(job["save_dir"]) / job["key"], report,
                                                              overwrite=True))
    row["child_s"] = round(time.perf_counter() - t_start, 2)
    atomic_write_json(Path(job["result"]), row)


# --------------------------------------------------------------------------- parent

def run_child(job: dict, work: Path, quiet: bool) -> dict:
    job_path = work / f"job-{abs(hash(job['key']))}.json"
    job["result"] = str(work / f"row-{abs(hash(job['key']))}.json")
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    if quiet:
        env["TQDM_DISABLE"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", str(job_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=None if not quiet else subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(job["result"]).is_file():
        tail = (proc.stderr or "").strip().splitlines()[-5:] if quiet else []
        raise RuntimeError(f"{job['key']}: child exited with {proc.returncode}" + (": " + " | ".join(tail) if tail else ""))
    row = json.loads(Path(job["result"]).read_text())
    row["process_wall_s"] = round(wall, 2)
    return row


def fmt_ppl(x: float | None) -> str:
    if x is None:
        return "—"
    if x != x or x == float("inf"):
        return str(x)
    if x >= 1e5:
        return f"{x:.2e}"
    if x >= 1000:
        return f"{x:.0f}"
    return f"{x:.1f}" if x >= 100 else f"{x:.3g}"


def render_markdown(results: dict) -> str:
    from soco_llm.ranks import RATIO_DEFINITION

    rows = results["rows"]
    env = results["environment"]
    s = results["settings"]
    dense = results.get("dense") or {}
    ratios = sorted({r["target_ratio"] for r in rows.values()})
    labels = list(dict.fromkeys(r["label"] for r in sorted(rows.values(), key=lambda r: r["order"])))
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
        "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |",
        "|---|" + "---:|" * len(ratios),
    ]
    for label in labels:
        cells = []
        for r in ratios:
            row = rows.get(f"{label}@{r:g}")
            cells.append(fmt_ppl(row["perplexity"]) if row else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost and achieved size",
        "",
        "Each row runs in its own fresh process. *compress (s)*: wall time of `compress()` "
        "(statistics + decompositions; not model load or evaluation). *peak RSS*: the process's "
        "resident-memory high-water mark during `compress()` alone (Linux VmHWM, reset just before "
        "the call), which includes the dense fp32 model already loaded (*before*) and the runtime. "
        "*achieved*: recounted from the compressed modules, by the definition above.",
        "",
        "| method | target | achieved | perplexity | tokens | compress (s) | peak RSS (MiB) | before (MiB) | ranks | model params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in sorted(rows.values(), key=lambda r: (r["order"], r["target_ratio"])):
        lines.append(
            f"| {row['label']} | {row['target_ratio']:g} | {row['achieved_ratio']:.4f} | {fmt_ppl(row['perplexity'])} "
            f"| {row['tokens']} | {row['compress_s']:.1f} | {row['peak_rss_mib']:.0f} "
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
    lines += [
        "",
        "## Environment",
        "",
        f"- command: `{env['command']}`",
        *[f"- resumed from an earlier run ({e.get('date')}): `{e.get('command')}`" for e in env.get("earlier_runs", [])],
        f"- date: {env['date']}; git commit {env.get('git_commit')}",
        f"- torch {env['torch']}, transformers {env['transformers']}, python {env['python']}",
        f"- CPU: {env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}; "
        f"load average at start {env.get('load_average_at_start')} (the machine is shared: times are indicative)",
        "",
        "![perplexity vs ratio](compare_methods.png)",
        "",
    ]
    return "\n".join(lines)


def render_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results["rows"].values(), key=lambda r: (r["order"], r["target_ratio"]))
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
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
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


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
    atomic_write_json(out_dir / f"{STEM}.json", results)
    if results["rows"]:
        atomic_write_text(out_dir / f"{STEM}.md", render_markdown(results))
        render_plot(results, out_dir / f"{STEM}.png")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else [sys.argv[0], *argv]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["svd", "fwsvd", "asvd", "svd-llm"],
                   help="registered method names (soco_llm.config.METHODS), or LABEL=METHOD for another row of a "
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
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--resume", action="store_true", help="skip rows already in <out-dir>/compare_methods.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars from the child processes")
    p.add_argument("--single", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv[1:])

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("soco_llm").setLevel(logging.WARNING)
    if args.single:
        run_single(args.single)
        return 0

    for mod in args.plugin:
        importlib.import_module(mod)
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

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
    results = {"version": RESULTS_VERSION, "settings": settings, "environment": environment(argv),
               "dense": None, "rows": {}}
    if args.resume and results_path.is_file():
        old = json.loads(results_path.read_text())
        if old.get("settings") != settings:
            raise SystemExit(f"{results_path} was made with other settings ({old.get('settings')}); "
                             "use another --out-dir or drop --resume")
        results["dense"] = old.get("dense")
        results["rows"] = {k: v for k, v in old.get("rows", {}).items() if "error" not in v}
        prev = old.get("environment") or {}
        results["environment"]["earlier_runs"] = prev.get("earlier_runs", []) + [
            {k: prev.get(k) for k in ("date", "command", "git_commit", "load_average_at_start")}]
        log.info("resuming: %d finished rows in %s", len(results["rows"]), results_path)

    if results["dense"] is None:
        t0 = time.perf_counter()
        ppl = soco_llm.evaluate_perplexity(model, tok, args.eval_data, args.eval_seq_len, args.eval_windows or None,
                                           args.eval_batch_size)
        results["dense"] = {**ppl.to_dict(), "eval_s": round(time.perf_counter() - t0, 2)}
        log.info("dense        %s", ppl)
        write_outputs(results, out_dir)
    del model  # children load their own copy from the safetensors cache

    todo = rows_to_run(results["rows"], rows_spec, args.ratios)
    failures = []
    with tempfile.TemporaryDirectory(prefix="compare-methods-") as work:
        work = Path(work)
        calib_path = work / "calib.safetensors"
        save_file({"windows": calib.contiguous()}, str(calib_path))
        bar = tqdm(total=len(todo), desc="rows", unit="row")
        lock = threading.Lock()

        def one_row(order: int, spec: RowSpec, r: float) -> None:
            key = spec.key(r)
            job = {"key": key, "label": spec.label, "method": spec.method, "settings": spec.settings, "ratio": r,
                   "calib_path": str(calib_path), "calibration": settings["calibration"],
                   "eval": settings["eval"], "threads": args.threads, "plugins": args.plugin,
                   "measure_size": key == args.size_row,
                   "save_dir": str(args.save_models.resolve()) if args.save_models else None}
            try:
                row = run_child(job, work, args.quiet)
            except RuntimeError as e:
                log.error("%s", e)
                with lock:
                    failures.append(key)
                    bar.update()
                return
            row["order"], row["parallel_jobs"] = order, args.jobs
            with lock:
                results["rows"][key] = row
                log.info("%-14s ratio %.2f (achieved %.4f): perplexity %s, compress %.1fs, peak RSS %.0f MiB",
                         spec.label, r, row["achieved_ratio"], fmt_ppl(row["perplexity"]), row["compress_s"],
                         row["peak_rss_mib"])
                write_outputs(results, out_dir)  # checkpoint: an interrupted run resumes from here
                bar.update()

        # Rows are independent processes; --jobs N runs N at once (their times then share the CPU).
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            for f in [pool.submit(one_row, *item) for item in todo]:
                f.result()
        bar.close()
    write_outputs(results, out_dir)
    print_table(results)
    if failures:
        print(f"failed rows (re-run with --resume to retry): {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
