"""Benchmark rows: each planned row run once, handed back to be checkpointed, resumable, optionally in a fresh process.

A results JSON holds {"settings", "environment", "rows": {key: row}, ...}. `start` begins one or,
with --resume, takes over an earlier file's finished rows, so an interrupted run loses at most
the row in flight. `run_rows` runs the pending rows (`parallel` at once), hands each finished row
to the script, which rewrites its outputs (the checkpoint), and collects failed keys instead of
stopping: a re-run with --resume retries just those. `run_fresh` runs a row as
`python SCRIPT FLAG JOB.json` in a new process, which calls `child`: a fresh process keeps the rows
independent (no state left over from the row before) and makes peak RSS and wall time the row's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger("harness.rows")
Job = TypeVar("Job")
# What a resumed run keeps of each earlier run's environment: enough to say how its rows were made.
EARLIER = ("date", "command", "git_commit", "load_average_1min", "load_average_at_start")


class RowFailed(RuntimeError):
    """A row's process failed; the message says how (exit status, the end of its stderr when captured)."""


def _earlier_runs(env: dict) -> list[dict]:
    """The runs before the one `env` records, oldest first (early zeroshot.json files nested them as resumed_from)."""
    if "earlier_runs" in env:
        return list(env["earlier_runs"])
    nested = env.get("resumed_from")
    return _earlier_runs(nested) + [{k: nested[k] for k in EARLIER if k in nested}] if nested else []


def start(path: Path, fresh: dict, resume: bool, prog: str, carry: tuple[str, ...] = ()) -> dict:
    """`fresh` (this run's settings, environment and empty rows), with an earlier run's rows when resuming.

    A file made with other settings is refused: its rows would not be comparable with new ones.
    Rows that recorded an "error" are dropped, so they run again. `carry`: other keys taken over
    (e.g. the dense baseline). The earlier run is appended to environment["earlier_runs"].
    """
    if not (resume and path.is_file()):
        return fresh
    old = json.loads(path.read_text(encoding="utf-8"))
    if old.get("settings") != fresh.get("settings"):
        raise SystemExit(f"{prog}: error: {path} was made with other settings ({old.get('settings')}); "
                         "use another --out-dir or drop --resume")
    fresh["rows"] = {k: v for k, v in old.get("rows", {}).items() if "error" not in v}
    fresh.update({key: old.get(key) for key in carry})
    prev = old.get("environment") or {}
    fresh["environment"]["earlier_runs"] = _earlier_runs(prev) + [{k: prev[k] for k in EARLIER if k in prev}]
    log.info("resuming: %d finished rows in %s", len(fresh["rows"]), path)
    return fresh


def run_rows(jobs: dict[str, Job], run: Callable[[str, Job], dict | None], done: Callable[[str, Job, dict], None],
             parallel: int = 1, errors: tuple[type[BaseException], ...] = (RowFailed,)) -> list[str]:
    """Run every job, `parallel` at once; call `done(key, job, row)` for each finished row; return the failed keys.

    `run` may return None to skip a job. `done` runs under a lock, so it may write the checkpoint
    even while other rows are running. An exception in `errors` fails that row only (logged).
    """
    failures: list[str] = []
    lock = threading.Lock()
    bar = tqdm(total=len(jobs), desc="rows", unit="row")

    def one(key: str, job: Job) -> None:
        try:
            row = run(key, job)
        except errors as e:
            log.error("%s: %s", key, e)
            with lock:
                failures.append(key)
                bar.update()
            return
        with lock:
            if row is not None:
                done(key, job, row)
            bar.update()

    if parallel > 1:  # threads only wait on child processes, so the GIL costs nothing
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            for f in [pool.submit(one, key, job) for key, job in jobs.items()]:
                f.result()
    else:  # in this thread: an in-process row (zeroshot.py) keeps torch and lm-eval on the main thread
        for key, job in jobs.items():
            one(key, job)
    bar.close()
    return failures


def run_fresh(script: str | os.PathLike, flag: str, key: str, job: dict, work: Path, quiet: bool = False) -> dict:
    """One row in a new process, `python SCRIPT FLAG JOB.json`; returns the row its `child` wrote.

    quiet: no progress bars from the child, and its stderr is kept for the error message instead of shown.
    Raises RowFailed when the child fails or writes no row.
    """
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    job_path, result = work / f"job-{name}.json", work / f"row-{name}.json"
    job_path.write_text(json.dumps({**job, "result": str(result)}), encoding="utf-8")
    env = {**os.environ, "TQDM_DISABLE": "1"} if quiet else None
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), flag, str(job_path)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if quiet else None, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        raise RowFailed(f"child exited with {proc.returncode}" + (": " + " | ".join(tail) if tail else ""))
    row = json.loads(result.read_text(encoding="utf-8"))
    row["process_wall_s"] = round(wall, 2)
    return row


def child(job_path: str | os.PathLike, run: Callable[[dict], dict]) -> None:
    """In the child process: run the job and write its row where the parent looks for it."""
    from soco_llm.io.atomic import atomic_write_json

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    atomic_write_json(job["result"], run(job))  # atomic: a child killed mid-write leaves no half row
