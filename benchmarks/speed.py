"""Prefill / decode throughput, peak memory and weight bytes: dense vs compressed, measured in one run.

    python benchmarks/speed.py --ratios 0.2 0.4 0.6                      # bundled model, SVD in-script
    python benchmarks/speed.py --models runs/a runs/b --device cuda      # saved compressed folders
    python benchmarks/speed.py --threads 2 --json out.json --markdown out.md
    python benchmarks/speed.py --model shape:smollm2-360m --ratios 0.4   # a larger public shape, random weights
    python benchmarks/speed.py --ratios 0.4 --threads 1 --processes 3    # medians over 3 fresh processes

Compressed models come from `soco_llm.compress(model, SVDConfig(ratio=r))` (data-free; the
method does not change the shapes, so it does not change speed) or from `--models` folders; the
dense `--model` is always measured first and every ratio (×) is against it. All models stay
loaded and are timed round-robin, so changes in machine load hit them alike (see harness/timing.py).
Fresh processes differ more than repeats within one (the cause is not isolated), so claims
should rest on `--processes 3` or more.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from soco_llm.errors import SocoError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file, however it is loaded
from harness.environment import command_line, hardware_info, load_average_1min, utc_now  # noqa: E402
from harness.outputs import emit  # noqa: E402
from harness.shapes import SHAPES  # noqa: E402
from harness.tables import speed_table  # noqa: E402
from harness.timing import BenchSettings, combine_processes, run  # noqa: E402


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="dense model: folder, .gguf, hub id, or shape:NAME for random weights in a public model's "
                        f"shape ({', '.join(SHAPES)}; speed depends on shapes only) (default: bundled SmolLM2)")
    p.add_argument("--ratios", type=_ratio, nargs="*", default=[0.2, 0.4, 0.6], help="SVD ratios compressed in-script")
    p.add_argument("--models", nargs="*", default=[], help="compressed model folders to measure as well")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--decode-prompt", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per decode run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--fast", action="store_true", help="decode every model through soco_llm.fast_inference "
                   "(static KV cache, compiled decode step; CUDA graphs on GPUs)")
    p.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                   help="keep glibc's allocator defaults (freed heap returned to the OS; noisier decode times)")
    p.add_argument("--processes", type=int, default=1,
                   help="repeat the whole measurement in this many fresh processes, one after another, and report "
                        "medians and the spread (processes differ more than repeats within one)")
    p.add_argument("--json", default=None, help="write the full results here (atomically)")
    p.add_argument("--markdown", default=None, help="write the Markdown table here (atomically)")
    return p


def measure_in_subprocess(argv: list[str]) -> dict:
    """The JSON results of one fresh `speed.py` process run with the same arguments (less --processes, outputs)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [sys.executable, os.path.abspath(__file__), *strip_options(argv), "--processes", "1", "--json", out]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SocoError(f"a measuring process failed: {last}")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def strip_options(argv: list[str]) -> list[str]:
    """argv without --processes, --json and --markdown and their values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--processes", "--json", "--markdown"):
            skip = True
        elif not a.startswith(("--processes=", "--json=", "--markdown=")):
            out.append(a)
    return out


def measure(args, argv: list[str]) -> dict:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SocoError("--device cuda given but torch sees no CUDA device")
    if args.new_tokens < 2 or min(args.prefill_lengths) < 1 or args.repeats < 1 or args.processes < 1:
        raise SocoError("--new-tokens must be >= 2, --prefill-lengths, --repeats and --processes >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(args.prefill_lengths, args.decode_prompt, args.new_tokens, args.warmup, args.repeats,
                             args.device, args.threads, malloc_tuning=args.malloc_tuning and args.device == "cpu",
                             fast=args.fast)
    hardware = {**hardware_info(args.device), "dtype": args.dtype}
    if args.processes > 1:
        runs = [measure_in_subprocess(argv) for _ in tqdm(range(args.processes), desc="measuring processes")]
        rows = combine_processes([r["results"] for r in runs])
        settings.malloc_tuning = all(r["settings"]["malloc_tuning"] for r in runs)
    else:
        rows = run(args.model, args.ratios, args.models, settings, args.dtype)
    hardware["load_average_1min_end"] = load_average_1min()
    command = command_line(__file__, argv)
    date = utc_now()
    markdown = speed_table(rows, hardware, settings) + f"\nCommand: `{command}` ({date}).\n"
    settings_out = {**vars(settings), "processes": args.processes}
    return {"hardware": hardware, "settings": settings_out, "results": rows, "command": command, "date": date,
            "markdown": markdown}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = measure(args, sys.argv[1:] if argv is None else argv)
    except SocoError as e:
        print(f"speed.py: error: {e}", file=sys.stderr)
        return 2
    emit(result["markdown"], args.markdown, args.json, {k: v for k, v in result.items() if k != "markdown"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
