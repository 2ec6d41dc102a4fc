"""Running the `soco` command in-process, and what a bad-input failure must look like: exit code 2 and one line."""

from __future__ import annotations

import re
from pathlib import Path

from soco_llm.cli import main

# tqdm bars (transformers' "Loading weights", ours) share stderr with the error; they are not part of it.
_PROGRESS = re.compile(r"\|\s*\d+/\d+ \[|it/s\]|s/it\]")


def run(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `soco ARGV`, usage errors included (argparse exits)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and not _PROGRESS.search(ln)]


def assert_one_line_error(code, err: str, needle: str = "") -> str:
    """Exit code 2, exactly one line on stderr (progress bars aside), no traceback; returns the line."""
    lines = error_lines(err)
    assert code == 2, f"exit code {code}; stderr: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("soco"), err
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def files_under(folder: Path) -> set[str]:
    """Every path below `folder`, hidden ones included (a stray temp file is something written)."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}
