"""What each `soco` subcommand does, given its parsed arguments; the parser lives in `cli.py`.

Generic over methods: the command line's options become config fields of the same name where
the method's config has them, presets come from the config class, and calibration sizes from
`config.calibration(...)`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from .compress import compress
from .data import calibration_windows
from .errors import SocoError
from .eval.perplexity import evaluate_perplexity
from .eval.zeroshot import check_options, evaluate_tasks, format_results, task_manager
from .io import export_dense, read_compression, save_compressed
from .methods import METHODS, config_for, export_from_run
from .models import load_model
from .runtime import init_distributed, is_main_process


def _eval(model, tok, args, label: str):
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


# CLI options that set the config field of the same name, for methods whose config has that field.
FIELD_OPTIONS = {"alpha": "alpha", "run_dir": "run_dir", "resume": "resume"}
# Calibration options: a method that trains on its own windows (a config field of that name) takes them as
# settings; for the others they size the calibration windows.
CALIBRATION_OPTIONS = {"samples": "num_samples", "seq_len": "seq_len", "batch_size": "batch_size", "seed": "seed"}


def _fields(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(METHODS[method])} if method in METHODS else set()


def method_kwargs(args) -> tuple[dict, str | None]:
    """The config settings the command line gives for `args.method`, and the preset it names."""
    fields = _fields(args.method)
    kwargs = {"ratio": args.ratio, "sequential": args.sequential, "target_modules": args.target_modules,
              "exclude_modules": args.exclude_modules}
    for option, name in FIELD_OPTIONS.items():
        value = getattr(args, option)
        if value in (None, False):
            continue
        if name not in fields and args.method in METHODS:
            users = sorted(m for m in METHODS if name in _fields(m))
            raise SocoError(f"--{option.replace('_', '-')} applies to --method {' / '.join(users)} only")
        kwargs[name] = value
    for option, name in CALIBRATION_OPTIONS.items():
        if name in fields and getattr(args, option) is not None:
            kwargs[name] = getattr(args, option)
    if "run_dir" in fields and "run_dir" not in kwargs:  # a trained method keeps its run beside the output
        out = Path(args.out)
        kwargs["run_dir"] = str(out.with_name(out.name + ".run"))
    kwargs.update(_parse_sets(args.set))
    preset = "quick" if args.quick else args.preset
    return kwargs, preset


def cmd_compress(args) -> None:
    out = Path(args.out)
    kwargs, preset = method_kwargs(args)
    config = config_for(args.method, preset, **kwargs)  # validates before any heavy work
    calib = config.calibration(args.calib, args.seed, args.samples, args.seq_len, args.batch_size)
    calib.validate()
    if out.exists() and not args.overwrite:
        raise SocoError(f"output folder {str(out)!r} already exists; pass --overwrite to replace it")
    baseline = config_for(args.baseline, ratio=args.ratio) if args.baseline else None
    if baseline is not None and not args.eval:
        raise SocoError("--baseline compares perplexities; drop --no-eval")
    init_distributed()  # under torchrun / accelerate launch; a no-op otherwise
    main_process = is_main_process()
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
    calib = config.calibration(args.calib, args.seed)
    windows = calibration_windows(tok, calib.source, calib.num_samples, calib.seq_len, calib.seed) if config.needs else None
    report = compress(model, config, windows, calib)
    print(report.summary())
    return _eval(model, tok, args, config.method)


def _finish(model, tok, report, args, dense=None, rows=()) -> None:
    """Evaluate (optionally) and save a compressed model."""
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
    if Path(args.out).exists() and not args.overwrite:
        raise SocoError(f"output folder {args.out!r} already exists; pass --overwrite to replace it")
    model, tok, report = export_from_run(args.run, args.ratio)
    print(report.summary())
    _finish(model, tok, report, args)


def cmd_eval(args) -> None:
    if args.tasks is None and (args.limit is not None or args.num_fewshot):
        raise SocoError("--limit and --num-fewshot apply to zero-shot tasks; add --tasks, e.g. --tasks soco_piqa")
    if args.tasks is not None:
        _zeroshot(args)
        return
    model, tok = load_model(args.model, args.dtype, args.device)
    _eval(model, tok, args, "perplexity")


def _zeroshot(args) -> None:
    """`soco eval --tasks`: lm-eval accuracy table instead of perplexity; names checked before loading."""
    check_options(args.limit, args.num_fewshot)
    manager = task_manager(args.tasks)
    model, tok = load_model(args.model, args.dtype, args.device)
    results = evaluate_tasks(model, tok, args.tasks, args.limit, args.eval_batch_size, args.num_fewshot,
                             manager=manager)
    print(format_results(results))


def cmd_info(args) -> None:
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
    read_compression(args.folder)
    if Path(args.out).exists() and not args.overwrite:
        raise SocoError(f"output folder {args.out!r} already exists; pass --overwrite to replace it")
    export_dense(args.folder, args.out, args.overwrite)
    print(f"wrote dense model to {args.out}")


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "info": cmd_info, "export": cmd_export,
            "export-dense": cmd_export_dense}
