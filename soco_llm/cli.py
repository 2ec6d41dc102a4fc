"""The `soco` command line: its parser and `main` (one line on stderr and exit code 2 for bad input).
The subcommands themselves are in `commands.py`."""

from __future__ import annotations

import argparse
import logging
import sys

from .commands import COMMANDS
from .errors import SocoError
from .methods import METHODS

log = logging.getLogger("soco_llm")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1), the fraction of parameters removed; got {value}")
    return value


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-data", default="bundled",
                   help="held-out text: bundled (BoolQ dev passages), wikitext2, c4, ptb, or a text file")
    p.add_argument("--eval-windows", type=int, default=24, help="number of windows to score; 0 = all (default 24)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="evaluation window length (default 512)")
    p.add_argument("--eval-batch-size", type=int, default=4)


def _add_zeroshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None, type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                   help="comma-separated lm-eval tasks, run instead of perplexity: soco_piqa, soco_openbookqa, "
                        "soco_boolq (offline), or any lm-eval task (arc_easy, hellaswag, ...; hub); batch size "
                        "is --eval-batch-size")
    p.add_argument("--limit", type=int, default=None, help="with --tasks: at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=0, help="with --tasks: few-shot examples (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soco", description="Compress Hugging Face causal LMs by low-rank factorisation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    c.add_argument("--method", required=True, help=f"one of: {', '.join(sorted(METHODS))}")
    c.add_argument("--ratio", required=True, type=_ratio, help="fraction of decoder-linear parameters removed, in (0, 1)")
    c.add_argument("--model", default=None, help="model folder, .gguf file or hub id (default: bundled SmolLM2-135M-Instruct)")
    c.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--calib", default="bundled", help="calibration text: bundled, wikitext2, c4, ptb, or a text file")
    c.add_argument("--samples", type=int, default=None, help="calibration windows (default 32; soco: 256)")
    c.add_argument("--seq-len", type=int, default=None, help="calibration window length (default 512; soco: 256)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=None, help="calibration / training batch size")
    c.add_argument("--sequential", action="store_true",
                   help="feed each block the outputs of the already-compressed earlier blocks")
    c.add_argument("--alpha", type=float, default=None, help="ASVD activation exponent (default 0.5)")
    c.add_argument("--target-modules", nargs="+", default=None, help="module names or regexes to compress")
    c.add_argument("--exclude-modules", nargs="+", default=None, help="module names or regexes to leave dense")
    c.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="any field of the method's config, value as JSON, e.g. --set steps=300 basis='\"plain\"'")
    c.add_argument("--preset", default=None, help="a named preset of the method's settings: "
                   + "; ".join(f"{m}: {', '.join(sorted(c.presets))}" for m, c in sorted(METHODS.items()) if c.presets))
    c.add_argument("--quick", action="store_true", help="--preset quick; soco: a short run (60 steps of 2x256 tokens, "
                   "under a fifth of the default's training tokens): faster, at higher perplexity")
    c.add_argument("--run-dir", default=None, help="soco: checkpoints and basis (default: OUT.run)")
    c.add_argument("--resume", action="store_true", help="soco: continue the run in --run-dir")
    c.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    c.add_argument("--device", default="cpu")
    c.add_argument("--no-eval", dest="eval", action="store_false", help="skip dense/compressed perplexity")
    c.add_argument("--baseline", default=None, metavar="METHOD",
                   help="also compress a fresh copy of the dense model with METHOD (its default calibration: "
                        "32x512 tokens of --calib) and print its perplexity beside the main method's")
    _add_eval_args(c)

    e = sub.add_parser("eval", help="perplexity (default) or, with --tasks, zero-shot accuracy of a model")
    e.add_argument("model", nargs="?", default=None, help="model folder, .gguf file or hub id (default: bundled model)")
    _add_eval_args(e)
    _add_zeroshot_args(e)
    e.add_argument("--dtype", default=None)
    e.add_argument("--device", default="cpu")

    i = sub.add_parser("info", help="ranks per layer, achieved ratio and sizes of a compressed folder")
    i.add_argument("folder")
    i.add_argument("--json", action="store_true", help="print the compression section as JSON")

    r = sub.add_parser("export", help="cut a finished SoCo run at another ratio, without retraining")
    r.add_argument("--from", dest="run", required=True, help="the SoCo run folder (OUT.run of `soco compress`)")
    r.add_argument("--ratio", required=True, type=_ratio)
    r.add_argument("--out", required=True)
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--no-eval", dest="eval", action="store_false")
    _add_eval_args(r)

    x = sub.add_parser("export-dense", help="write an ordinary dense HF folder from a compressed one")
    x.add_argument("folder")
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        COMMANDS[args.command](args)
    except SocoError as e:
        print(f"soco: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soco: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
