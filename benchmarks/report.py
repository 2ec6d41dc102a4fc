"""Build docs/RESULTS.md from the result files in benchmarks/results/; it measures nothing itself.

    python benchmarks/report.py            # (re)write docs/RESULTS.md
    python benchmarks/report.py --check    # write nothing; exit 1 if a result JSON is missing or RESULTS.md is stale

Inputs: compare_methods.json (perplexity), zeroshot.json (accuracy), speed_cpu.json (speed and
memory), decode_profile_cpu.md and decode_profile_fast_cpu.md, speed_cpu_360m.md, layer_crossover_cpu.md,
soco_bench.json, heal/heal_table.json (healing side by side) with heal_cli.md, and compare_methods.json in any other
subfolder (extra runs). A missing input gives a "not measured yet: run
<command>" line in its section. The output has no generation date, so it changes only when the inputs change.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, however it is loaded
from harness.environment import REPO, RESULTS  # noqa: E402
from harness.tables import acc_cell, chances, perplexity_table  # noqa: E402  the scripts' own formats

log = logging.getLogger("report")

COMMANDS = {
    "compare_methods.json": "python benchmarks/compare_methods.py --methods svd fwsvd asvd svd-llm soco "
                            "--ratios 0.2 0.4 0.6 --sequential --jobs 2 --threads 1 --save-models runs/bench --quiet, "
                            "then --methods soco soco-plain-quick=soco --set soco-plain-quick.basis='\"plain\"' "
                            "(and steps=60 batch_size=2 num_samples=64) --resume, then --methods soco-plain=soco "
                            "--set soco-plain.basis='\"plain\"' --ratios 0.4 --resume",
    "soco_timing.md": "/usr/bin/time -v soco compress --method soco --ratio 0.4 --out runs/timing-soco-0.4 --no-eval",
    "zeroshot.json": "python benchmarks/zeroshot.py --methods svd svd-llm --ratios 0.2 0.4 0.6 "
                     "--tasks soco_piqa soco_openbookqa --limit 300, then --methods fwsvd asvd --ratios 0.4 and "
                     "--models soco@0.2=runs/bench/soco@0.2 soco@0.4=... soco@0.6=... with --resume",
    "speed_cpu.json": "OMP_NUM_THREADS=1 python benchmarks/speed.py --ratios 0.2 0.4 0.6 --threads 1 --repeats 5 "
                      "--processes 3 --json benchmarks/results/speed_cpu.json "
                      "--markdown benchmarks/results/speed_cpu.md",
    "soco_bench.json": "python benchmarks/soco_bench.py --full-ratios --quick-ratios 0.4 --threads 1, then "
                       "--export-from runs/bench/soco@0.4.run --no-ablation --quick-ratios --resume",
    "layer_crossover_cpu.md": "python benchmarks/layer_crossover.py --threads 1 "
                              "--markdown benchmarks/results/layer_crossover_cpu.md",
    "decode_profile_cpu.md": "OMP_NUM_THREADS=1 python benchmarks/decode_profile.py --ratio 0.4 --threads 1 "
                             "--new-tokens 64 --json benchmarks/results/decode_profile_cpu.json "
                             "--markdown benchmarks/results/decode_profile_cpu.md",
    "decode_profile_fast_cpu.md": "OMP_NUM_THREADS=1 python benchmarks/decode_profile.py --ratio 0.4 --threads 1 "
                                  "--new-tokens 64 --fast --json benchmarks/results/decode_profile_fast_cpu.json "
                                  "--markdown benchmarks/results/decode_profile_fast_cpu.md",
    "heal/heal_table.json": "python benchmarks/heal_table.py --ratios 0.2 0.4 0.6 --heal-steps 60 --out-dir "
                            "benchmarks/results/heal --jobs 2 --threads 1",
    "speed_cpu_360m.md": "OMP_NUM_THREADS=1 python benchmarks/speed.py --model shape:smollm2-360m --ratios 0.4 "
                         "--threads 1 --repeats 3 --prefill-lengths 128 --processes 3 "
                         "--json benchmarks/results/speed_cpu_360m.json "
                         "--markdown benchmarks/results/speed_cpu_360m.md",
    "speed_cpu_fast_intel.md": "OMP_NUM_THREADS=1 python benchmarks/speed.py --ratios 0.2 0.4 0.6 --threads 1 "
                               "--repeats 5 --prefill-lengths 128 --fast --json "
                               "benchmarks/results/speed_cpu_fast_intel.json "
                               "--markdown benchmarks/results/speed_cpu_fast_intel.md",
    "sibling_gemm_cpu.md": "OMP_NUM_THREADS=1 python benchmarks/sibling_gemm.py --threads 1 "
                           "--markdown benchmarks/results/sibling_gemm_cpu.md",
    "train_step_chunked_head_cpu.md": "python benchmarks/train_step.py --steps 6 --repeats 2 --variants full-product "
                                      "whole-logits library --markdown "
                                      "benchmarks/results/train_step_chunked_head_cpu.md",
    "heal/default_run.md": "/usr/bin/time -v soco compress --method soco --ratio 0.4 --out runs/default04",
}


class Inputs:
    """Reads the result files once; remembers which JSONs are missing or unreadable."""

    def __init__(self, results_dir: Path):
        self.dir = results_dir
        self.missing: list[str] = []

    def json(self, name: str) -> dict | None:
        path = self.dir / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.missing.append(name)
        except (OSError, json.JSONDecodeError) as e:
            log.error("%s is unreadable (%s); treating it as missing", path, e)
            self.missing.append(name)
        return None

    def text(self, name: str) -> str | None:
        path = self.dir / name
        return path.read_text(encoding="utf-8") if path.is_file() else None


def not_measured(name: str) -> list[str]:
    return [f"*Not measured yet: run `{COMMANDS[name]}`.*", ""]


def image(inputs: Inputs, out: Path, name: str, alt: str) -> list[str]:
    path = inputs.dir / name
    if not path.is_file():
        return []
    return [f"![{alt}]({Path(os.path.relpath(path, out.parent)).as_posix()})", ""]


def env_lines(env: dict, extra: str = "", show_resumed: bool = False) -> list[str]:
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "lm_eval", "python") if env.get(k))
    cores = env.get("cpu_count") or env.get("usable_cpus")
    load = env.get("load_average_at_start") or env.get("load_average_1min") or "not recorded"
    commit = f"; git commit {env['git_commit']}" if env.get("git_commit") else ""
    lines = [f"- command: `{env.get('command', 'not recorded')}`",
             f"- date: {env.get('date', 'not recorded')}{commit}{extra}",
             f"- {versions}",
             f"- CPU: {env.get('cpu', '?')}, {cores} cores, torch threads {env.get('torch_threads', '?')}; "
             f"load average at start {load} (a shared machine: times are indicative)"]
    # the run this one resumed (older zeroshot.json files name it "resumed_from")
    earlier = env.get("earlier_runs") or ([env["resumed_from"]] if env.get("resumed_from") else [])
    if show_resumed and earlier:
        lines.append(f"- resumed a run started {earlier[-1].get('date', '?')}")
    return lines + [""]


# --------------------------------------------------------------------------- sections

def ratio_section() -> list[str]:
    from soco_llm.core.budget import RATIO_DEFINITION

    return ["## Compression ratio", "", f"{RATIO_DEFINITION}.", "",
            "A ratio of 0.4 removes 40 % of those parameters. Baselines use the uniform rank "
            "r = ⌊m·n·(1−ratio)/(m+n)⌋; SoCo chooses ranks per layer by its learned scores.", ""]


def perplexity_section(inputs: Inputs, out: Path) -> list[str]:
    lines = ["## Perplexity (lower is better)", ""]
    data = inputs.json("compare_methods.json")
    if data is None:
        return lines + not_measured("compare_methods.json")
    s, dense = data["settings"], data.get("dense") or {}
    rows = list(data.get("rows", {}).values())
    lines += [f"Model {s['model']}. Held-out BoolQ dev passages ({s['eval']['source']}): first "
              f"{s['eval']['windows']} windows of {s['eval']['seq_len']} tokens, BOS prepended and not scored, "
              f"{dense.get('tokens', '?')} scored tokens. Calibration: {s['calibration']['num_samples']} windows of "
              f"{s['calibration']['seq_len']} tokens from `{s['calibration']['source']}` (seed "
              f"{s['calibration']['seed']}), the same for every method.", ""]
    if not rows:
        return lines + ["No compressed rows yet.", ""] + env_lines(data["environment"])
    lines += perplexity_table(data, with_dense=True)
    gap = max(abs(r["achieved_ratio"] - r["target_ratio"]) for r in rows)
    lines += [f"Achieved ratios are within {gap:.4f} of the targets. Cost per row (compression time, peak "
              f"memory, ranks, saved size): [compare_methods.md]"
              f"({Path(os.path.relpath(inputs.dir / 'compare_methods.md', out.parent)).as_posix()}).", ""]
    lines += image(inputs, out, "compare_methods.png", "perplexity vs ratio")
    lines += env_lines(data["environment"])
    for extra in sorted(inputs.dir.glob("*/compare_methods.json")):
        try:
            more = json.loads(extra.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if more.get("rows"):
            # a trained method (SoCo) records the windows it drew itself; say those when every row did
            own = {json.dumps(r.get("calibration"), sort_keys=True) for r in more["rows"].values()}
            c = json.loads(own.pop()) if len(own) == 1 and "null" not in own else more["settings"]["calibration"]
            lines += [f"### Extra run: `{extra.parent.name}` ({c['num_samples']} calibration windows of "
                      f"{c['seq_len']})", ""] + perplexity_table(more, with_dense=True) + [
                      f"Command: `{more['environment'].get('command')}`; date {more['environment'].get('date')}.", ""]
    return lines


def zeroshot_section(inputs: Inputs, out: Path, ratio: float) -> list[str]:
    lines = ["## Zero-shot accuracy (higher is better)", ""]
    data = inputs.json("zeroshot.json")
    if data is None:
        return lines + not_measured("zeroshot.json")
    s = data["settings"]
    tasks = s["tasks"]
    rows = sorted((r for r in data.get("rows", {}).values()
                   if r["method"] == "dense" or abs(r["ratio"] - ratio) < 1e-9), key=lambda r: r.get("order", 1e9))
    limit = f"the first {s['limit']} documents" if s.get("limit") else "all documents"
    lines += [f"Model {s['model']}, lm-eval {s.get('num_fewshot', 0)}-shot, {limit} of each task; dense against every "
              f"model at ratio {ratio:g}. Cells: accuracy ± standard error. Chance: {chances(tasks) or '?'}.", "",
              "| model | achieved ratio | " + " | ".join(tasks) + " |", "|---|---:|" + "---:|" * len(tasks)]
    for r in rows:
        ach = r.get("achieved_ratio")
        lines.append(f"| {r['label']} | {'—' if ach is None else f'{ach:.3f}'} | "
                     + " | ".join(acc_cell(r["tasks"].get(t)) for t in tasks) + " |")
    if len(rows) <= 1:
        lines.append(f"| (no model at ratio {ratio:g} yet) | | " + " | ".join("" for _ in tasks) + " |")
    link = Path(os.path.relpath(inputs.dir / "zeroshot.md", out.parent)).as_posix()
    lines += ["", f"Every ratio, and acc_norm: [zeroshot.md]({link}).", ""]
    lines += image(inputs, out, "zeroshot_vs_ratio.png", "zero-shot accuracy vs ratio")
    return lines + env_lines(data["environment"], f"; --limit {s.get('limit')}", show_resumed=True)


def speed_section(inputs: Inputs, out: Path) -> list[str]:
    lines = ["## Speed and memory (CPU)", ""]
    data = inputs.json("speed_cpu.json")
    if data is None:
        lines += not_measured("speed_cpu.json")
    else:
        hw, st = data["hardware"], data["settings"]
        lengths = [str(n) for n in st["prefill_lengths"]]
        spread = "decode_speedup_per_process" in data["results"][0]
        lines += ["| model | achieved ratio | " + " | ".join(f"prefill@{n} tok/s (×)" for n in lengths)
                  + " | decode tok/s (×) |" + (" decode × per process |" if spread else "")
                  + " decode × by CPU time | decode limit × | weights MiB | peak MiB |",
                  "|---|---:|" + "---:|" * (len(lengths) + 5 + spread)]
        for r in data["results"]:
            pre = " | ".join(f"{r['prefill_tok_s'][n]:.0f} ({r['prefill_speedup'][n]:.2f})" for n in lengths)
            per = r.get("decode_speedup_per_process") or []
            lines.append(f"| {r['label']} | {r['achieved_ratio']:.3f} | {pre} | {r['decode_tok_s']:.1f} "
                         f"({r['decode_speedup']:.2f}) |" + (f" {min(per):.2f}–{max(per):.2f} |" if spread else "")
                         + f" {r['decode_speedup_cpu']:.2f} | {r['decode_limit']:.2f} | "
                         f"{r['weight_bytes'] / 2**20:.1f} | {r['peak_mib']:.0f} |")
        md = inputs.text("speed_cpu.md") or ""
        found = re.search(r"Command: `([^`]+)`", md)
        command = data.get("command") or (found.group(1) if found else "not recorded")
        lines += ["", f"Batch 1, {hw.get('dtype', 'float32')}, device {st['device']}. Prefill: one forward pass over "
                  f"the prompt. Decode: greedy generation after a {st['decode_prompt']}-token prompt, "
                  f"{st['new_tokens']} new tokens, prefill excluded. Median of {st['repeats']} after {st['warmup']} "
                  "warm-up, all models timed round-robin in one process"
                  + (f", then the median over {st.get('processes')} such processes (*decode × per process*: the "
                     "lowest and highest of their own ratios)" if spread else "")
                  + "; (×) = against dense in the same run. "
                  "*decode limit ×*: dense / compressed weight bytes read per decode step, the speed-up if "
                  "decoding were purely bandwidth-bound. *peak MiB*: weights + working memory of one prefill and "
                  "decode run.", "",
                  f"- command: `{command}`",
                  f"- date: {data.get('date', 'not recorded in speed_cpu.json')}",
                  f"- torch {hw.get('torch')}, transformers {hw.get('transformers')}, python {hw.get('python')}",
                  f"- CPU: {hw.get('cpu')}, {hw.get('usable_cpus')} usable CPUs, torch threads "
                  f"{hw.get('torch_threads')}; 1-min load average {hw.get('load_average_1min')} at start, "
                  f"{hw.get('load_average_1min_end')} at end (a shared machine: absolute tok/s are indicative)", ""]
        if found:
            link = Path(os.path.relpath(inputs.dir / "speed_cpu.md", out.parent)).as_posix()
            lines += [f"The same table with working memory: [speed_cpu.md]({link}); other runs (2 threads, glibc's "
                      "allocator defaults, a saved SoCo model) are the `speed_cpu_*.md` files beside it.", ""]
    for name, title in (("decode_profile_cpu.md", "Where a decode step's time goes (ratio 0.4)"),
                        ("speed_cpu_360m.md", "A larger shape: SmolLM2-360M, random weights"),
                        ("speed_cpu_fast_intel.md", "The fast path (static KV cache, compiled decode), Intel Xeon"),
                        ("decode_profile_fast_cpu.md", "Where a compiled decode step's time goes (fast path, 0.4)"),
                        ("sibling_gemm_cpu.md", "One GEMM for the A factors of sibling layers (not adopted)")):
        text = inputs.text(name)
        lines += [f"### {title}", ""] + ([_untitled(text), ""] if text else not_measured(name))
    lines += ["### One layer: dense vs factored vs merged", ""]
    crossover = inputs.text("layer_crossover_cpu.md")
    lines += [crossover.strip(), ""] if crossover else not_measured("layer_crossover_cpu.md")
    lines += [f"The file does not record its command or date; to remake it: `{COMMANDS['layer_crossover_cpu.md']}`.",
              ""] if crossover else []
    return lines


def soco_section(inputs: Inputs) -> list[str]:
    """benchmarks/soco_bench.py renders its own table; embed it under this report's heading."""
    lines = ["## SoCo: main rows, ablations, other ratios from one run", ""]
    data = inputs.json("soco_bench.json")
    text = inputs.text("soco_bench.md")
    if data is None or text is None:
        return lines + not_measured("soco_bench.json")
    lines += [_untitled(text), ""]
    timing = inputs.text("soco_timing.md")
    lines += ["### Wall time and memory of one full run", ""]
    lines += [_untitled(timing), ""] if timing else not_measured("soco_timing.md")
    for name, title in (("train_step_chunked_head_cpu.md", "The training step: chunked output head, kept-only product"),
                        ("heal/default_run.md", "The default run at 0.4 (SoCo, then its default healing)")):
        text = inputs.text(name)
        lines += [f"### {title}", ""] + ([_untitled(text), ""] if text else not_measured(name))
    return lines


def heal_section(inputs: Inputs) -> list[str]:
    """benchmarks/heal_table.py renders its own table (healing side by side); embed it, then the first CLI runs."""
    lines = ["## Healing after the cut: every method with and without it, on two kinds of text", ""]
    data, text = inputs.json("heal/heal_table.json"), inputs.text("heal/heal_table.md")
    lines += [_untitled(text), ""] if data is not None and text is not None else not_measured("heal/heal_table.json")
    small_step = inputs.text("heal/soco_heal_lr3e-5.md")
    if small_step:
        lines += ["### How SoCo's healing step was chosen (lr 3e-5)", "", _untitled(small_step), ""]
    for folder, title in (("soco_lr1e-4", "The first table: SoCo healed at lr 1e-4"),
                          ("svd_llm_lr3e-5", "SVD-LLM healed at SoCo's lr 3e-5")):
        earlier = inputs.text(f"heal/{folder}/heal_table.md")
        if earlier:
            lines += [f"### {title}", "", _untitled(earlier), ""]
    adapter = inputs.text("heal_adapter/heal_table.md")
    if adapter:
        lines += ["### Healing a low-rank adapter on each factor instead (`--heal-mode adapter`)", "", _untitled(adapter), ""]
    sequential = inputs.text("soco_sequential.md")
    if sequential:
        lines += ["### SoCo's sequential basis (`--sequential`)", "", _untitled(sequential), ""]
    first = inputs.text("heal_cli.md")
    return lines + (["### First measurements (40 steps, BoolQ dev only)", "", _untitled(first), ""] if first else [])


def _untitled(text: str) -> str:
    """A result file's Markdown without its own title, to embed under this report's heading."""
    return (text.split("\n", 1)[1] if text.startswith("# ") else text).strip()


def render(results_dir: Path, out: Path, zeroshot_ratio: float = 0.4) -> tuple[str, list[str]]:
    """(Markdown text, missing or unreadable JSON inputs)."""
    inputs = Inputs(results_dir)
    rel = Path(os.path.relpath(results_dir, out.parent)).as_posix()
    lines = ["# Results", "",
             f"Generated by `python benchmarks/report.py` from the files in [{rel}]({rel}); do not edit by hand. "
             "Each section names the command, versions, hardware and date of its measurement. See "
             "benchmarks/README.md for what each script measures.", ""]
    lines += ratio_section()
    lines += perplexity_section(inputs, out)
    lines += zeroshot_section(inputs, out, zeroshot_ratio)
    lines += speed_section(inputs, out)
    lines += soco_section(inputs)
    lines += heal_section(inputs)
    return "\n".join(lines).rstrip() + "\n", inputs.missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="result files folder")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "RESULTS.md")
    p.add_argument("--zeroshot-ratio", type=float, default=0.4, help="ratio of the zero-shot table (default 0.4)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if any result JSON is missing or the output is out of date")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.results.is_dir():
        print(f"report.py: error: results folder {str(args.results)!r} not found", file=sys.stderr)
        return 2
    try:
        text, missing = render(args.results, args.out, args.zeroshot_ratio)
    except (KeyError, TypeError, ValueError) as e:
        print(f"report.py: error: a result file has an unexpected structure ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    if args.check:
        stale = not args.out.is_file() or args.out.read_text(encoding="utf-8") != text
        for name in missing:
            log.error("missing: %s (run: %s)", name, COMMANDS[name])
        if stale:
            log.error("%s is out of date; run: python benchmarks/report.py", args.out)
        return 1 if missing or stale else 0
    from soco_llm.io.atomic import atomic_write_text  # only here: checking and rendering need no torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    log.info("wrote %s%s", args.out, f"; not measured yet: {', '.join(missing)}" if missing else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
