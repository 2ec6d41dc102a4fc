"""The `soco` command: compress, eval, info, export-dense."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path

from .errors import SocoError

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
    from .config import METHODS

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
    c.add_argument("--quick", action="store_true", help="soco: a short run (60 steps of 2x256 tokens, under a "
                   "fifth of the default's training tokens): faster, at higher perplexity")
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


def _eval(model, tok, args, label: str):
    from .evaluate import evaluate_perplexity

    res = evaluate_perplexity(model, tok, args.eval_data, args.eval_seq_len, args.eval_windows or None,
                              args.eval_batch_size)
    print(f"{label:<12} {res}")
    return res


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SocoError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string
    return out


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_compress(args) -> None:
    from .compress import compress
    from .config import CalibrationConfig, config_for
    from .data import calibration_windows
    from .models import load_model
    from .soco import QUICK

    out = Path(args.out)
    kwargs = {"ratio": args.ratio, "sequential": args.sequential, "target_modules": args.target_modules,
              "exclude_modules": args.exclude_modules}
    if args.alpha is not None:
        kwargs["alpha"] = args.alpha
    if args.method == "soco":
        kwargs.update(QUICK if args.quick else {})
        kwargs.update(run_dir=args.run_dir or str(out.with_name(out.name + ".run")), resume=args.resume, seed=args.seed)
        for key, value in (("num_samples", args.samples), ("seq_len", args.seq_len), ("batch_size", args.batch_size)):
            if value is not None:
                kwargs[key] = value
    elif args.quick or args.resume or args.run_dir:
        raise SocoError("--quick, --resume and --run-dir apply to --method soco only")
    kwargs.update(_parse_sets(args.set))
    config = config_for(args.method, **kwargs)  # validates before any heavy work
    samples = getattr(config, "num_samples", None) or args.samples or 32
    seq_len = getattr(config, "seq_len", None) or args.seq_len or 512
    calib = CalibrationConfig(args.calib, samples, seq_len, args.seed, args.batch_size or 8)
    calib.validate()
    if out.exists() and not args.overwrite:
        raise SocoError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
    baseline = config_for(args.baseline, ratio=args.ratio) if args.baseline else None
    if baseline is not None and not args.eval:
        raise SocoError("--baseline compares perplexities; drop --no-eval")
    main_process = _is_main_process()
    model, tok = load_model(args.model, args.dtype, args.device)
    dense = _eval(model, tok, args, "dense") if args.eval and main_process else None
    rows = [("dense", dense)] if dense is not None else []
    if baseline is not None and main_process:
        rows.append((baseline.method, _run_baseline(copy.deepcopy(model), tok, baseline, args)))
    windows = calibration_windows(tok, calib.source, calib.num_samples, calib.seq_len, calib.seed)
    report = compress(model, config, windows, calib)
    if not main_process:
        return
    report.config["calibration"] = vars(calib)
    print(report.summary())
    _finish(model, tok, report, args, dense, rows)


def _run_baseline(model, tok, config, args) -> None:
    """Compress a copy of the dense model with a baseline method, print its perplexity, drop it."""
    from .compress import compress
    from .data import calibration_windows

    windows = calibration_windows(tok, args.calib, 32, 512, args.seed) if config.needs else None
    report = compress(model, config, windows)
    print(report.summary())
    return _eval(model, tok, args, config.method)


def _finish(model, tok, report, args, dense=None, rows=()) -> None:
    """Evaluate (optionally) and save a compressed model."""
    from .io import save_compressed

    compressed = _eval(model, tok, args, report.method) if args.eval else None
    if compressed is not None:
        report.config["eval"] = {"compressed": compressed.to_dict()}
        if dense is not None:
            report.config["eval"]["dense"] = dense.to_dict()
    save_compressed(model, tok, args.out, report, overwrite=args.overwrite)
    print(f"saved to {args.out}  (took {report.seconds:.1f}s)")
    if len(rows) > 1 and compressed is not None:  # side by side, same held-out windows
        table = [*rows, (report.method, compressed)]
        print(f"\nperplexity at ratio {report.target_ratio} on {compressed.tokens} held-out tokens:")
        print("  " + "  ".join(f"{name}: {res.perplexity:.1f}" for name, res in table))


def cmd_export(args) -> None:
    from .soco import export_from_run

    if Path(args.out).exists() and not args.overwrite:
        raise SocoError(f"output folder {args.out!r} already exists; pass --overwrite to replace it")
    model, tok, report = export_from_run(args.run, args.ratio)
    print(report.summary())
    _finish(model, tok, report, args)


def cmd_eval(args) -> None:
    from .models import load_model

    if args.tasks is None and (args.limit is not None or args.num_fewshot):
        raise SocoError("--limit and --num-fewshot apply to zero-shot tasks; add --tasks, e.g. --tasks soco_piqa")
    if args.tasks is not None:
        _zeroshot(args, load_model)
        return
    model, tok = load_model(args.model, args.dtype, args.device)
    _eval(model, tok, args, "perplexity")


def _zeroshot(args, load_model) -> None:
    """`soco eval --tasks`: lm-eval accuracy table instead of perplexity; names checked before loading."""
    from .zeroshot import check_options, evaluate_tasks, format_results, task_manager

    check_options(args.limit, args.num_fewshot)
    manager = task_manager(args.tasks)
    model, tok = load_model(args.model, args.dtype, args.device)
    results = evaluate_tasks(model, tok, args.tasks, args.limit, args.eval_batch_size, args.num_fewshot,
                             manager=manager)
    print(format_results(results))


def cmd_info(args) -> None:
    from .io import read_compression

    comp = read_compression(args.folder)
    if args.json:
        print(json.dumps(comp, indent=2))
        return
    report_path = Path(args.folder) / "compression_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    rows = report.get("layers") or [{"name": n, "rank": r} for n, r in comp["ranks"].items()]
    print(f"method: {comp['method']}   target ratio: {comp.get('target_ratio')}   "
          f"achieved ratio: {comp.get('achieved_ratio', float('nan')):.4f}")
    print(f"ratio definition: {comp.get('ratio_definition')}")
    if report:
        print(f"whole model: {report['model_params_before'] / 1e6:.2f}M -> {report['model_params_after'] / 1e6:.2f}M params")
    size = sum(f.stat().st_size for f in Path(args.folder).glob("*.safetensors"))
    print(f"weights on disk: {size / 2**20:.1f} MiB")
    print(f"{'layer':<48} {'out x in':>12} {'rank':>6} {'ratio':>7}")
    for r in rows:
        shape = f"{r['out_features']}x{r['in_features']}" if "out_features" in r else ""
        rank = r["rank"] if r["rank"] else "dense"
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        print(f"{r['name']:<48} {shape:>12} {rank:>6} {ratio:>7}")


def cmd_export_dense(args) -> None:
    from .io import export_dense, read_compression

    read_compression(args.folder)
    if Path(args.out).exists() and not args.overwrite:
        raise SocoError(f"output folder {args.out!r} already exists; pass --overwrite to replace it")
    export_dense(args.folder, args.out, args.overwrite)
    print(f"wrote dense model to {args.out}")


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "info": cmd_info, "export": cmd_export,
            "export-dense": cmd_export_dense}


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
