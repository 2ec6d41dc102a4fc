"""The stages `soco compress` and `soco export` share around the cut: perplexity on every --eval-data
source with the held-out KL to the dense model (measured in the same pass), healing's settings from the
command line with its checkpoint rules (never restarted over unasked, continued with --resume), the
unhealed model's measurement, and the teacher a finished run cached. Knows no method by name.
"""

from __future__ import annotations

from pathlib import Path

from .data import check_source
from .errors import SocoError
from .eval.perplexity import evaluate_perplexity
from .heal import HealConfig, heal_checkpoint_step
from .learned.run_folder import TEACHER_FILE, load_teacher

HELDOUT_TOPK = HealConfig.teacher_topk  # the dense log-probs kept on held-out windows: as many as training uses


def evaluate(model, tok, args, label: str, reference: dict | None = None, keep: bool = False) -> dict:
    """{source: perplexity result} on every --eval-data source. `reference`: the dense model's results (kept
    with `keep`), so this model's held-out KL to the dense model is measured in the same pass."""
    out = {}
    for source in args.eval_data:
        ref = reference[source].kept if reference else None
        out[source] = evaluate_perplexity(model, tok, source, args.eval_seq_len, args.eval_windows or None,
                                          args.eval_batch_size, ref, HELDOUT_TOPK if keep else 0)
        print(f"{label:<12} {'' if len(args.eval_data) == 1 else source + ': '}{out[source]}")
    return out


def eval_record(results: dict) -> dict:
    return {source: res.to_dict() for source, res in results.items()}


def check_eval_data(args) -> None:
    if getattr(args, "eval", True):
        for source in args.eval_data:
            check_source(source, "--eval-data")


def heal_config(args, seed: int, defaults: dict) -> HealConfig:
    """Healing's settings from the command line, where it gives them, else the method's `defaults`
    (`heal_defaults()` of its config), else HealConfig's (off); checkpoints in OUT.heal."""
    given = {"steps": args.heal_steps, "lr": args.heal_lr}
    chosen = {k: v if v is not None else defaults.get(k, getattr(HealConfig, k)) for k, v in given.items()}
    cfg = HealConfig(**chosen, schedule=args.heal_schedule, batch_size=args.heal_batch_size, seed=seed,
                     mode=args.heal_mode, adapter_rank=args.heal_adapter_rank,
                     run_dir=str(Path(args.out).with_name(Path(args.out).name + ".heal")), resume=args.resume)
    cfg.validate()  # its numbers were checked as options; this checks the rest
    step = heal_checkpoint_step(Path(cfg.run_dir)) if cfg.steps else None
    if step is not None and not cfg.resume:  # a checkpoint is work: never restarted over unasked
        raise SocoError(f"{cfg.run_dir} holds a healing checkpoint at step {step}; pass --resume to continue it, "
                        "or delete that folder to heal from the start")
    return cfg


def measure_before_heal(tok, args, dense, rows, main_process: bool):
    """The `on_cut` of `compress()`: with evaluation, the unhealed model is measured (a row of its own), so one
    run gives the method with and without healing on the same windows."""
    def on_cut(model, report) -> None:
        if args.eval and main_process:
            before = evaluate(model, tok, args, report.method, dense)
            rows.append((report.method, before))
            report.config.setdefault("eval", {})["before_heal"] = eval_record(before)
    return on_cut


def run_teacher(run_dir: Path):
    """The dense teacher a learned run cached, with the windows it is for: what healing after an export needs."""
    try:
        teacher = load_teacher(run_dir)
    except Exception as e:  # missing (a blockwise run caches none) or damaged
        raise SocoError(f"healing needs the dense model's teacher cached in the run folder, and {str(run_dir)!r} has no "
                        f"readable {TEACHER_FILE} ({str(e).splitlines()[0]}); export without --heal-steps, or heal "
                        "with `soco compress ... --heal-steps N`") from None
    if teacher.windows is None:
        raise SocoError(f"{str(run_dir)!r} was written by an older soco-llm: its cached teacher does not record its "
                        "windows; export without --heal-steps, or heal with `soco compress ... --heal-steps N`")
    return teacher
