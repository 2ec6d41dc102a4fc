"""The timing scripts' outputs: the Markdown they print, and the --markdown / --json copies they write.

speed.py, decode_profile.py and layer_crossover.py all print one Markdown text and can keep it,
and their numbers, in files; committed results are such files, so they are written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path


def emit(markdown: str, markdown_path: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
         results: dict | None = None) -> None:
    """Print `markdown` (the script's output), then write `results` to json_path and `markdown` to markdown_path."""
    from soco_llm.io.atomic import atomic_write_json, atomic_write_text

    print(markdown)
    for path, write, content in ((json_path, atomic_write_json, results), (markdown_path, atomic_write_text, markdown)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # the atomic writers do not make folders
            write(path, content)
