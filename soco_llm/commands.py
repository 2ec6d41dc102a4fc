"""What each `soco` subcommand does, given its parsed arguments; the parser lives in `cli.py`.

Knows no method: the command line's options become config fields of the same name where the method's
config has them (`cli_options`, the calibration sizes, --run-dir / --resume), presets come from the config
class, calibration sizes from `config.calibration(...)`, the recipe (healing included) is `compress()`'s,
and `soco export` re-cuts a run of any learned method (`learned.recut`). Every command checks all its
inputs (options, config, files, output folder) before it loads a model, so bad input costs nothing and
writes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from .compress import check_target, compress, compressed_bytes
from .command_checks import check_out, fit_eval_window, read_paths
from .data import calibration_windows, check_source
from .errors import SocoError
from .eval.generate import generate
from .command_stages import (check_eval_data, eval_record, evaluate, heal_config, measure_before_heal,
                             run_teacher)
from .heal import HealConfig, heal_report
from .eval.zeroshot import check_options, evaluate_tasks, format_results, task_manager
from .info import print_info
from .io import atomic, check_folder, disk, export_dense, save_compressed
from .learned.recut import export_from_run, run_config
from .methods import METHODS, config_for
from .core.streamed import open_streamed_with_tokenizer
from .models import default_model_dir, fit_window, load_model
from .quantize.cli import check_run_ranks, quantize_before_save, quantize_folder, round_ranks
from .runtime import init_distributed, is_main_process, parse_dtype, resolve_device


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


def field_options() -> dict[str, str]:
    """CLI options that set the config field of the same name, for methods whose config has that field: every
    config's `cli_options`, and --resume (a learned method's run; else healing's, OUT.heal)."""
    names = {name for cls in METHODS.values() for name in cls.cli_options} | {"resume"}
    return {name: name for name in sorted(names)}
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
    for option, name in field_options().items():
        value = getattr(args, option)
        if value is None or value is False:  # not given (0 is a value: --alpha 0 is plain SVD)
            continue
        if option == "resume" and name not in fields and getattr(args, "heal_steps", 0):
            continue  # --resume continues the healing (OUT.heal) of a method that trains nothing else
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
    """Every input is checked first (options, config, run folder, text files, output folder); only then is the
    model loaded."""
    device = resolve_device(args.device)
    check_source(args.calib, "--calib")  # even where a data-free method will not read it: a bad file is a mistake
    kwargs, preset = method_kwargs(args)
    config = config_for(args.method, preset, **kwargs)  # validates every field before any heavy work
    round_ranks(args, config)  # --quantize: ranks a multiple of what the layout needs
    config.preflight()
    calib = config.calibration(args.calib, args.seed, args.samples, args.seq_len, args.batch_size)
    calib.validate()
    baseline = config_for(args.baseline, ratio=args.ratio) if args.baseline is not None else None
    if baseline is not None and not args.eval:
        raise SocoError("--baseline compares perplexities; drop --no-eval")
    check_eval_data(args)
    check_out(args.out, args.overwrite, args.model, getattr(config, "run_dir", None), *read_paths(args))
    heal_cfg = heal_config(args, args.seed, config.heal_defaults())
    streamed = check_block_sequential(args, config, baseline, heal_cfg)
    init_distributed(device)  # under torchrun / accelerate launch; a no-op otherwise
    main_process = is_main_process()
    model, tok = (open_streamed_with_tokenizer(streamed, parse_dtype(args.dtype), device) if streamed
                  else load_model(args.model, args.dtype, device))
    # What needs the model's shapes, before any work: the ratio can be met, the windows fit, the output fits.
    targets = check_target(model, config)
    calib.seq_len = fit_window(model, calib.seq_len, "--seq-len",
                               given=args.seq_len is not None or "seq_len" in _fields(args.method))
    if args.eval:
        fit_eval_window(model, args)
    if main_process:
        disk.check_free_space(args.out, compressed_bytes(model, targets, config.ratio), "--out")
    dense = evaluate(model, tok, args, "dense", keep=True) if args.eval and main_process and not streamed else None
    rows = [("dense", dense)] if dense is not None else []
    if baseline is not None and main_process:
        rows.append((baseline.method, _run_baseline(copy.deepcopy(model), tok, baseline, args, dense)))
    windows = (calibration_windows(tok, calib.source, calib.num_samples, calib.seq_len, calib.seed)
               if config.needs else None)  # a data-free method reads no text
    # Every method heals on the same tokens against the same teacher (SoCo's default training windows, cached
    # from the dense model before the cut), so SVD-LLM + healing is a fair baseline. A method whose run caches
    # that very teacher hands it back (`teacher_windows()`): it is not computed twice.
    heal_windows = None
    if heal_cfg.steps and config.teacher_windows() != heal_cfg.teacher_windows():
        heal_windows = calibration_windows(tok, calib.source, heal_cfg.num_samples, heal_cfg.seq_len, heal_cfg.seed)
    on_cut = measure_before_heal(tok, args, dense, rows, main_process) if heal_cfg.steps else None
    report = compress(model, config, windows, calib, heal_cfg, heal_windows, on_cut)
    if not main_process:
        return
    report.config["calibration"] = vars(calib)
    print(report.summary())
    _finish(model, tok, report, args, dense, rows)


def check_block_sequential(args, config, baseline, heal_cfg) -> str | None:
    """With --pipeline block-sequential, the model folder its blocks are read from, once the run is checked to need
    nothing of the whole dense model; None for the whole-model pipeline."""
    if args.pipeline != "block-sequential":
        return None
    refusal = config.block_sequential_refusal()
    if refusal:
        raise SocoError(f"--pipeline block-sequential: {refusal}")
    if baseline is not None or heal_cfg.steps:
        raise SocoError("--pipeline block-sequential never holds the whole dense model, which --baseline and "
                        "healing need; drop them, or use --pipeline whole-model")
    folder = args.model if args.model is not None else str(default_model_dir())
    if not Path(folder).is_dir() or not (Path(folder) / "config.json").is_file():
        raise SocoError(f"--pipeline block-sequential reads a dense model folder's safetensors, and {folder!r} is not "
                        "a model folder; convert it first (soco export-dense, or save_dense)")
    return folder


def _run_baseline(model, tok, config, args, dense=None) -> dict:
    """Compress a copy of the dense model with a baseline method, print its perplexity, drop it."""
    calib = config.calibration(args.calib, args.seed)
    calib.seq_len = fit_window(model, calib.seq_len, "--baseline's calibration", given=False)
    windows = calibration_windows(tok, calib.source, calib.num_samples, calib.seq_len, calib.seed) if config.needs else None
    report = compress(model, config, windows, calib, HealConfig())  # the method alone: healing is --heal-steps'
    print(report.summary())
    return evaluate(model, tok, args, config.method, dense)


def _finish(model, tok, report, args, dense=None, rows=()) -> None:
    """Quantize (--quantize), evaluate (optionally) and save a compressed model."""
    quantize_before_save(model, report, args)
    label = report.method + ("+heal" if report.config.get("heal") else "")
    compressed = evaluate(model, tok, args, label, dense) if args.eval else None
    if compressed is not None:
        report.config.setdefault("eval", {})["compressed"] = eval_record(compressed)
        if dense is not None:
            report.config["eval"]["dense"] = eval_record(dense)
    save_compressed(model, tok, args.out, report, overwrite=args.overwrite)
    print(f"saved to {args.out}  (took {report.seconds:.1f}s)")
    if len(rows) > 1 and compressed is not None:  # side by side, same held-out windows
        table = [*rows, (label, compressed)]
        for source, res in compressed.items():
            print(f"\nperplexity at ratio {report.target_ratio} on {res.tokens} held-out tokens"
                  f"{'' if len(compressed) == 1 else ' of ' + source}:")
            print("  " + "  ".join(f"{name}: {r[source].perplexity:.1f}" for name, r in table))


def cmd_export(args) -> None:
    device = resolve_device(args.device)
    cfg, _ = run_config(args.run)  # run.json readable and valid, before the model is loaded
    check_run_ranks(args, cfg)
    check_eval_data(args)
    check_out(args.out, args.overwrite, args.run, *read_paths(args))
    heal_cfg = heal_config(args, cfg.seed, cfg.heal_defaults())  # the method's own healing, as `compress` gives it
    if heal_cfg.steps:
        teacher = run_teacher(Path(args.run))
    model, tok, report = export_from_run(args.run, args.ratio, device=device)
    if args.eval:
        fit_eval_window(model, args)
    if heal_cfg.steps:
        measure_before_heal(tok, args, None, [], True)(model, report)
        heal_report(model, report, teacher, heal_cfg)
    print(report.summary())
    _finish(model, tok, report, args)


def cmd_eval(args) -> None:
    if args.tasks is None and (args.limit is not None or args.num_fewshot):
        raise SocoError("--limit and --num-fewshot apply to zero-shot tasks; add --tasks, e.g. --tasks soco_piqa")
    device = resolve_device(args.device)
    if args.tasks is not None:
        _zeroshot(args, device)
        return
    check_eval_data(args)
    model, tok = load_model(args.model, args.dtype, device)  # a compressed folder's format is checked first
    fit_eval_window(model, args)
    evaluate(model, tok, args, "perplexity")


def _zeroshot(args, device) -> None:
    """`soco eval --tasks`: lm-eval accuracy table instead of perplexity; names checked before loading."""
    check_options(args.limit, args.num_fewshot)
    manager = task_manager(args.tasks)
    model, tok = load_model(args.model, args.dtype, device)
    results = evaluate_tasks(model, tok, args.tasks, args.limit, args.eval_batch_size, args.num_fewshot,
                             manager=manager)
    print(format_results(results))


def cmd_info(args) -> None:
    comp = check_folder(args.folder)  # ranks, factors and weights checked: a damaged folder is exit 2, not a table
    if args.json:
        print(json.dumps(comp, indent=2))
        return
    print_info(Path(args.folder), comp)


def cmd_export_dense(args) -> None:
    check_folder(args.folder)
    check_out(args.out, args.overwrite, args.folder)
    export_dense(args.folder, args.out, args.overwrite)
    print(f"wrote dense model to {args.out}")


def cmd_clean(args) -> None:
    """Clean up what killed saves left beside an output path, or in a folder (`io.atomic.clean_stale`)."""
    path = Path(args.path)
    if not args.path.strip():
        raise SocoError("soco clean needs a path; give an output folder or a folder to clean, e.g. `soco clean runs`")
    if path.exists() and not path.is_dir():
        raise SocoError(f"{args.path!r} is a file; give an output folder or a folder to clean")
    if not path.absolute().parent.is_dir():
        raise SocoError(f"{str(path.absolute().parent)!r} not found; give an output folder or a folder to clean")
    removed = atomic.clean_stale(path, dry_run=args.dry_run)
    for p in removed:  # removed, or an old folder put back where its output path was empty
        print(f"{'would clean up' if args.dry_run else 'cleaned up'} {p}")
    if not removed:
        print(f"nothing to clean at {args.path}")


def cmd_generate(args) -> None:
    model, tok = load_model(args.model, args.dtype, resolve_device(args.device))
    g = generate(model, tok, args.prompt, args.max_new_tokens, args.chat, args.fast)
    print(g.text)
    print(f"\n{g.new_tokens} new tokens after a {g.prompt_tokens}-token prompt in {g.seconds:.2f}s: "
          f"{g.tokens_per_s:.1f} tokens/s (greedy, prefill included{', fast path' if args.fast else ''})")


def cmd_quantize(args) -> None:
    quantize_folder(args, check_out, load_model)


COMMANDS = {"quantize": cmd_quantize, "compress": cmd_compress, "eval": cmd_eval, "info": cmd_info, "export": cmd_export,
            "export-dense": cmd_export_dense, "clean": cmd_clean, "generate": cmd_generate}
