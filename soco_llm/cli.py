"""The `soco` command line: its parser and `main` (one line on stderr and exit code 2 for bad input).
The subcommands themselves are in `commands.py`. It knows no method: method options, defaults and
presets in the help come from the registered configs (`cli_options`, `calibration()`, `heal_defaults()`)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import typing

from .checks import at_least, class_rules, option_type
from .commands import COMMANDS
from .heal import HealConfig
from .errors import SocoError
from .eval.perplexity import EVAL_RULES, EVAL_SEQ_LEN
from .core.trainer import Interrupted
from .methods import METHODS, CalibrationConfig, CompressionConfig
from .quantize.cli import add_quantize_args, add_quantize_parser
from .runtime import DEVICE_CHOICES, DTYPE_CHOICES, keep_freed_host_memory

log = logging.getLogger("soco_llm")

_ratio = option_type(float, CompressionConfig.rules["ratio"], name="ratio")
_calib = {k: option_type(int, rule) for k, rule in CalibrationConfig.rules.items()}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES}; auto: CUDA when available, else the CPU "
                   "(default auto)")


def _recipes(key: str, fmt: str = "{}") -> str:
    """`key` of each method's default healing (its recipe, `heal_defaults()` of a default config), else HealConfig's."""
    given = {m: cls().heal_defaults().get(key) for m, cls in sorted(METHODS.items())}
    named = "; ".join(f"{fmt.format(v)} for {m}" for m, v in given.items() if v is not None)
    return (named + "; " if named else "") + f"{fmt.format(getattr(HealConfig, key))} for the other methods"


def _add_heal_args(p: argparse.ArgumentParser) -> None:
    rules = HealConfig.rules
    p.add_argument("--heal-steps", type=option_type(int, rules["steps"]), default=None,
                   help="after the cut, train the kept factors this many steps by KL to the dense model (0: off); "
                        "checkpoints in OUT.heal, continued with --resume (default: the method's recipe, as "
                        f"soco_llm.compress gives it: {_recipes('steps')}; a recipe may depend on the run's settings)")
    p.add_argument("--heal-lr", type=option_type(float, rules["lr"]), default=None,
                   help=f"healing's learning rate (default: {_recipes('lr', '{:g}')})")
    p.add_argument("--heal-schedule", choices=rules["schedule"].choices, default=HealConfig.schedule,
                   help="healing's learning rate over its steps: constant, or cosine (a short warm-up, then down "
                        f"to 0) (default {HealConfig.schedule})")
    p.add_argument("--heal-batch-size", type=option_type(int, rules["batch_size"]), default=HealConfig.batch_size)
    p.add_argument("--heal-mode", choices=rules["mode"].choices, default=HealConfig.mode,
                   help="what healing trains: the kept factors themselves, or a low-rank adapter on each factor, "
                        "merged back exactly (default factors)")
    p.add_argument("--heal-adapter-rank", type=option_type(int, rules["adapter_rank"]), default=HealConfig.adapter_rank,
                   help="--heal-mode adapter: the rank of each factor's update (default 16)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-data", nargs="+", default=["bundled"], metavar="SOURCE",
                   help="held-out text, one or more: bundled (BoolQ dev passages), pubmed (PubMedQA abstracts), "
                        "wikitext2, c4, ptb, or a text file (default bundled)")
    p.add_argument("--eval-windows", type=option_type(int, EVAL_RULES["max_windows"]), default=24,
                   help="number of windows to score; 0 = all (default 24)")
    p.add_argument("--eval-seq-len", type=option_type(int, EVAL_RULES["seq_len"]), default=None,
                   help=f"evaluation window length (default {EVAL_SEQ_LEN}, or the model's positions where fewer)")
    p.add_argument("--eval-batch-size", type=option_type(int, EVAL_RULES["batch_size"]), default=4)


def _add_zeroshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None, type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                   help="comma-separated lm-eval tasks, run instead of perplexity: soco_piqa, soco_openbookqa, "
                        "soco_boolq (offline), or any lm-eval task (arc_easy, hellaswag, ...; hub); batch size "
                        "is --eval-batch-size")
    p.add_argument("--limit", type=int, default=None, help="with --tasks: at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=0, help="with --tasks: few-shot examples (default 0)")


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """Each registered config's `cli_options`: --field-name, typed and ranged as the field."""
    seen: set[str] = set()
    for cls in (METHODS[m] for m in sorted(METHODS)):
        hints = typing.get_type_hints(cls)
        for name, text in cls.cli_options.items():
            if name in seen:
                continue
            seen.add(name)
            users = ", ".join(m for m in sorted(METHODS) if name in METHODS[m].cli_options)
            tp = next((t for t in (bool, int, float, str) if t in (hints[name], *typing.get_args(hints[name]))), str)
            flag = "--" + name.replace("_", "-")
            if tp is bool:
                p.add_argument(flag, dest=name, action="store_true", default=None, help=f"{users}: {text}")
            else:
                p.add_argument(flag, dest=name, default=None, help=f"{users}: {text}",
                               type=option_type(tp, class_rules(cls).get(name), name=name))


def _calibration_default(key: str) -> str:
    """The default of a calibration size, and where a method's config has its own."""
    base = getattr(CalibrationConfig, key)
    own = {m: getattr(cls().calibration(), key) for m, cls in sorted(METHODS.items())}
    return "; ".join([f"default {base}"] + [f"{m}: {v}" for m, v in own.items() if v != base])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="soco", description="Compress Hugging Face causal LMs by low-rank factorisation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save it")
    c.add_argument("--method", required=True, help=f"one of: {', '.join(sorted(METHODS))}")
    c.add_argument("--ratio", required=True, type=_ratio, help="fraction of decoder-linear parameters removed, in (0, 1)")
    c.add_argument("--model", default=None, help="model folder, .gguf file or hub id (default: bundled SmolLM2-135M-Instruct)")
    c.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--calib", default="bundled", help="calibration text: bundled, pubmed, wikitext2, c4, ptb, or a text file")
    c.add_argument("--samples", type=_calib["num_samples"], default=None,
                   help=f"calibration windows ({_calibration_default('num_samples')})")
    c.add_argument("--seq-len", type=_calib["seq_len"], default=None,
                   help=f"calibration window length ({_calibration_default('seq_len')})")
    c.add_argument("--seed", type=_calib["seed"], default=0)
    c.add_argument("--batch-size", type=_calib["batch_size"], default=None, help="calibration / training batch size")
    c.add_argument("--sequential", action="store_true",
                   help="feed each block the outputs of the already-compressed earlier blocks")
    _add_method_options(c)
    c.add_argument("--target-modules", nargs="+", default=None, help="module names or regexes to compress")
    c.add_argument("--exclude-modules", nargs="+", default=None, help="module names or regexes to leave dense")
    c.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="any field of the method's config, value as JSON, e.g. --set steps=300 basis='\"plain\"'")
    c.add_argument("--preset", default=None, help="a named preset of the method's settings: "
                   + "; ".join(f"{m}: {', '.join(sorted(c.presets))}" for m, c in sorted(METHODS.items()) if c.presets))
    c.add_argument("--quick", action="store_true", help="--preset quick (" + ", ".join(
                   sorted(m for m, cls in METHODS.items() if "quick" in cls.presets)) + "): a short run, faster, "
                   "at higher perplexity")
    c.add_argument("--resume", action="store_true", help="continue the learned method's run in --run-dir, and the "
                   "healing in OUT.heal")
    c.add_argument("--pipeline", default="whole-model", choices=("whole-model", "block-sequential"),
                   help="whole-model: the dense model in memory (default); block-sequential: decoder blocks read one at "
                        "a time from the model folder's safetensors, so the dense model is never in memory whole (a "
                        "method that walks the blocks, e.g. soco with --set blockwise=true; no dense evaluation, "
                        "baseline or healing, which need the whole dense model)")
    c.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES,
                   help="the model's dtype while compressing and in the saved folder (default: float32; auto: the "
                        "checkpoint's own, e.g. float16 for many Llama-2 and OPT checkpoints)")
    _add_device_arg(c)
    c.add_argument("--no-eval", dest="eval", action="store_false", help="skip dense/compressed perplexity")
    _add_heal_args(c)
    c.add_argument("--baseline", default=None, metavar="METHOD",
                   help="also compress a fresh copy of the dense model with METHOD (its default calibration: "
                        "32x512 tokens of --calib) and print its perplexity beside the main method's")
    _add_eval_args(c)
    add_quantize_args(c)

    e = sub.add_parser("eval", help="perplexity (default) or, with --tasks, zero-shot accuracy of a model")
    e.add_argument("model", nargs="?", default=None, help="model folder, .gguf file or hub id (default: bundled model)")
    _add_eval_args(e)
    _add_zeroshot_args(e)
    e.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="default: as saved (auto)")
    _add_device_arg(e)

    i = sub.add_parser("info", help="ranks per layer, achieved ratio and sizes of a compressed folder")
    i.add_argument("folder")
    i.add_argument("--json", action="store_true", help="print the compression section as JSON")

    r = sub.add_parser("export", help="cut a finished run of a learned method (soco) at another ratio, without "
                       "retraining (and heal it, with --heal-steps, on the run's own windows and cached teacher)")
    r.add_argument("--from", dest="run", required=True, help="the run folder (OUT.run of `soco compress`)")
    r.add_argument("--ratio", required=True, type=_ratio)
    r.add_argument("--out", required=True)
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--no-eval", dest="eval", action="store_false")
    _add_heal_args(r)
    r.add_argument("--resume", action="store_true", help="with --heal-steps: continue the healing in OUT.heal")
    _add_device_arg(r)
    _add_eval_args(r)
    add_quantize_args(r)

    x = sub.add_parser("export-dense", help="write an ordinary dense HF folder from a compressed one")
    x.add_argument("folder")
    x.add_argument("--out", required=True)
    x.add_argument("--overwrite", action="store_true")

    g = sub.add_parser("generate", help="greedy text from a model (dense or compressed), with tokens/s")
    g.add_argument("model", nargs="?", default=None, help="model folder, .gguf file or hub id (default: bundled model)")
    g.add_argument("--prompt", default="The capital of France is", help="text to continue")
    g.add_argument("--max-new-tokens", type=option_type(int, at_least(1)), default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--fast", action="store_true", help="decode on the fast path (static KV cache, compiled decode "
                   "step; CUDA graphs on GPUs); an untimed first run compiles it")
    g.add_argument("--dtype", default=None, choices=DTYPE_CHOICES, help="default: as saved (auto)")
    _add_device_arg(g)

    add_quantize_parser(sub)

    k = sub.add_parser("clean", help="clean up the temporary and moved-aside folders that killed saves left")
    k.add_argument("path", nargs="?", default=".",
                   help="an output folder (what was left beside it) or a folder to clean (default: .)")
    k.add_argument("--dry-run", action="store_true", help="only list what would be cleaned up")
    return parser


def _interrupted(e: KeyboardInterrupt, argv: list[str]) -> str:
    """The last line after Ctrl-C: true about what is on disk, and the command that continues, if any."""
    if not isinstance(e, Interrupted):
        return "soco: interrupted; no output folder is left half-written (every save is atomic)"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        again = "the same torchrun command with --resume"
    else:
        again = "soco " + shlex.join(argv if "--resume" in argv else [*argv, "--resume"])
    return f"soco: interrupted; {e.kept}; continue with: {again}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if os.environ.get("SOCO_KEEP_HOST_MEMORY") == "1":  # opt-in: faster CPU steps, higher peak RSS (runtime.py)
        keep_freed_host_memory()
    try:
        COMMANDS[args.command](args)
    except SocoError as e:
        print(f"soco: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(_interrupted(e, argv), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
