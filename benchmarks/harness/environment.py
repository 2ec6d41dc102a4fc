"""Where, when and how a benchmark ran: hardware, versions, load, git commit and the command to repeat it.

`hardware_info` is what timing numbers were measured on (speed.py keeps it beside its results);
`environment` adds the date, the command, the commit and package versions, for the scripts whose
results JSON carries one `environment` record (compare_methods.py, zeroshot.py, soco_bench.py).
Every script names its command through `command_line`, so the recorded command can be pasted back.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"  # where every script writes by default, and report.py reads


def repo_relative(path: str | os.PathLike) -> str:
    """Repo-relative when inside the repo, else the bare name: committed results name no machine's folders."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else p.name


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line(script: str | os.PathLike, argv: list[str]) -> str:
    """The command that reproduces a run, with the OpenMP thread count it ran under (it changes the timings)."""
    omp = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={omp} " if omp else "") + "python " + shlex.join([repo_relative(script), *argv])


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average_1min() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def hardware_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    import torch

    info = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if (transformers := package_version("transformers")) is not None:
        info["transformers"] = transformers
    if (load := load_average_1min()) is not None:
        info["load_average_1min"] = load
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def environment(script: str | os.PathLike, argv: list[str], device: str = "cpu", **extra) -> dict:
    """The record a results JSON keeps of its run: date, command, commit, versions, hardware, and `extra`."""
    return {"date": utc_now(), "command": command_line(script, argv), "git_commit": git_commit(),
            "soco_llm": package_version("soco-llm"), **hardware_info(device), **extra}
