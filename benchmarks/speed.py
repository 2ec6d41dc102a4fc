"""Prefill / decode throughput, peak memory and weight bytes: dense vs compressed, measured in one run.

    python benchmarks/speed.py --ratios 0.2 0.4 0.6                      # bundled model, SVD in-script
    python benchmarks/speed.py --models runs/a runs/b --device cuda      # saved compressed folders
    python benchmarks/speed.py --threads 2 --json out.json --markdown out.md
    python benchmarks/speed.py --model shape:smollm2-360m --ratios 0.4       # a larger public shape, random weights

Compressed models come from `soco_llm.compress(model, SVDConfig(ratio=r))` (data-free; the
method does not change the shapes, so it does not change speed) or from `--models` folders; the
dense `--model` is always measured first and every ratio (×) is against it. All models stay
loaded and are timed round-robin, so changes in machine load hit them alike (see soco_llm/bench.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from soco_llm.bench import SHAPES, BenchSettings, hardware_info, markdown_table, run, write_text_atomic
from soco_llm.errors import SocoError
from soco_llm.io import atomic_write_json


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="dense model: folder, .gguf, hub id, or shape:NAME for random weights in a public model's shape "
                        f"({', '.join(SHAPES)}; speed depends on shapes only) (default: bundled SmolLM2)")
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
    p.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false",
                   help="keep glibc's allocator defaults (freed heap returned to the OS; noisier decode times)")
    p.add_argument("--json", default=None, help="write the full results here (atomically)")
    p.add_argument("--markdown", default=None, help="write the Markdown table here (atomically)")
    return p


def measure(args, argv: list[str]) -> dict:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SocoError("--device cuda given but torch sees no CUDA device")
    if args.new_tokens < 2 or min(args.prefill_lengths) < 1 or args.repeats < 1:
        raise SocoError("--new-tokens must be >= 2, --prefill-lengths and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(args.prefill_lengths, args.decode_prompt, args.new_tokens, args.warmup, args.repeats,
                             args.device, args.threads, malloc_tuning=args.malloc_tuning and args.device == "cpu")
    hardware = {**hardware_info(args.device), "dtype": args.dtype}
    rows = run(args.model, args.ratios, args.models, settings, args.dtype)
    hardware["load_average_1min_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    omp = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={omp} " if omp else "") + "python benchmarks/speed.py " + shlex.join(argv)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    markdown = markdown_table(rows, hardware, settings) + f"\nCommand: `{command}` ({date}).\n"
    return {"hardware": hardware, "settings": vars(settings), "results": rows, "command": command, "date": date,
            "markdown": markdown}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = measure(args, sys.argv[1:] if argv is None else argv)
    except SocoError as e:
        print(f"speed.py: error: {e}", file=sys.stderr)
        return 2
    print(result["markdown"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, {k: v for k, v in result.items() if k != "markdown"})
    if args.markdown:
        write_text_atomic(args.markdown, result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
