"""What `soco info` prints about a compressed folder: method, ratios, sizes and the ranks per layer.

It reads `compression_report.json` when the folder has one, and checks that file before printing
anything, so a damaged report is one line (exit 2), not a traceback halfway through the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .checks import at_least, problem
from .errors import SocoError

REPORT = "compression_report.json"
# What the table reads from a report row or the report itself; anything else in them is left alone.
_ROW_FIELDS = {"name": str, "rank": int, "out_features": int, "in_features": int, "ratio": float}
_REPORT_FIELDS = {"model_params_before": int, "model_params_after": int, "layers": list}


def _problem(what: dict, fields: dict, optional: bool) -> str | None:
    for key, tp in fields.items():
        if key not in what:
            if optional:
                continue
            return f"{key!r} is missing"
        wrong = problem(what[key], tp, at_least(0) if tp is int else None)  # counts and ranks are >= 0
        if wrong:
            return f"{key!r} {wrong}"
    return None


def read_report(folder: Path) -> dict:
    """The folder's compression report ({} without one), checked field by field."""
    path = folder / REPORT
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SocoError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); re-create the folder, or delete "
                        f"{REPORT} to see the ranks from config.json alone") from None
    wrong = "it is not an object" if not isinstance(report, dict) else _problem(report, _REPORT_FIELDS, False)
    for row in report["layers"] if wrong is None else []:
        wrong = ("it is not an object" if not isinstance(row, dict)
                 else _problem(row, {"name": str, "rank": int}, False) or _problem(row, _ROW_FIELDS, True))
        if wrong:
            wrong = f"a layer row: {wrong}"
            break
    if wrong:
        raise SocoError(f"{path} is damaged ({wrong}); re-create the folder, or delete {REPORT} to see the ranks "
                        "from config.json alone")
    return report


def _number(value) -> float:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def print_info(folder: Path, comp: dict) -> None:
    """The table `soco info` prints for a folder whose `compression` section `comp` was checked
    (`io.format.check_folder`: ranks, factors, weights)."""
    report = read_report(folder)
    rows = report.get("layers") or [{"name": n, "rank": r} for n, r in comp["ranks"].items()]
    print(f"method: {comp.get('method')}   target ratio: {comp.get('target_ratio')}   "
          f"achieved ratio: {_number(comp.get('achieved_ratio')):.4f}")
    print(f"ratio definition: {comp.get('ratio_definition')}")
    if report:
        print(f"whole model: {report['model_params_before'] / 1e6:.2f}M -> "
              f"{report['model_params_after'] / 1e6:.2f}M params")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"weights on disk: {size / 2**20:.1f} MiB")
    quant = comp.get("quantization")
    if quant:
        group = f", groups of {quant['group_size']}" if quant.get("group_size") else ""
        print(f"quantized: {quant['scheme']}{group}, {len(quant['layers'])} decoder linears")
    print(f"{'layer':<48} {'out x in':>12} {'rank':>6} {'ratio':>7}")
    for r in rows:
        shape = f"{r['out_features']}x{r['in_features']}" if "out_features" in r and "in_features" in r else ""
        rank = r["rank"] if r["rank"] else "dense"
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        print(f"{r['name']:<48} {shape:>12} {rank:>6} {ratio:>7}")
